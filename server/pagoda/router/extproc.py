"""Gateway mode: Pagoda's scheduler as the endpoint picker of a Gateway API Inference Extension pool.

Envoy (Envoy Gateway, Istio, kgateway, GKE) calls this over its external-processing gRPC protocol with
each request's headers and body; the answer names the replica in the `x-gateway-destination-endpoint`
header and the same value in the `envoy.lb` dynamic metadata (the EPP protocol), and Envoy sends the
request there itself. Envoy must send the request body buffered (`request_body_mode: BUFFERED`): the
prompt is what the choice depends on. A subset hint in the request's metadata
(`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`) limits the choice. No ready replica:
the request waits like a proxied one (`--hold-timeout`), then gets an immediate 503.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from pagoda.router.backends import Backend
from pagoda.router.proxy import NoBackend, Router, parse_body

DESTINATION = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE, SUBSET_KEY = "envoy.lb.subset_hint", "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"


def endpoint(url: str) -> str:
    """http://10.0.0.5:8000 -> 10.0.0.5:8000, the EPP protocol's form."""
    return urlsplit(url).netloc


def subset_hint(metadata: base_pb2.Metadata) -> set[str] | None:
    if SUBSET_NAMESPACE not in metadata.filter_metadata:
        return None
    fields = metadata.filter_metadata[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    return {value.string_value for value in fields[SUBSET_KEY].list_value.values}


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()))


def destination_response(address: str) -> pb.ProcessingResponse:
    mutation = pb.HeaderMutation(set_headers=[_set(DESTINATION, address)])
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION: address}})
    common = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata)


def unavailable(message: str) -> pb.ProcessingResponse:
    body = {"error": {"message": message, "type": "service_unavailable", "param": None, "code": 503}}
    headers = pb.HeaderMutation(set_headers=[_set("content-type", "application/json")])
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
            headers=headers,
            body=json.dumps(body).encode(),
            details="no ready endpoint",
        )
    )


class EndpointPicker(pb_grpc.ExternalProcessorServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def Process(  # noqa: N802 - the gRPC method's name
        self, requests: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        picked: Backend | None = None
        body, subset = bytearray(), None
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "request_headers":
                    subset = subset_hint(request.metadata_context)
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
                elif kind == "request_body":
                    body += request.request_body.body
                    if not request.request_body.end_of_stream:
                        yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                        continue
                    try:
                        picked = await self._pick(parse_body(bytes(body)), subset)
                    except NoBackend as error:
                        yield unavailable(error.reason)
                        return
                    yield destination_response(endpoint(picked.url))
                elif kind == "response_headers":
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                elif kind == "response_body":
                    yield pb.ProcessingResponse(response_body=pb.BodyResponse())
                elif kind == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        finally:  # the stream ends with the HTTP request: it no longer loads its replica
            if picked is not None:
                picked.in_flight -= 1
                self.router.metrics.in_flight.labels(picked.url).dec()

    async def _pick(self, body: Mapping[str, object] | None, subset: set[str] | None) -> Backend:
        allowed = None
        if subset is not None:  # the protocol: pick from the subset, or answer 503 at once
            allowed = {url for url in self.router.pool.backends if endpoint(url) in subset}
            if not self.router.eligible(allowed):
                raise NoBackend("no ready endpoint in the gateway's subset")
        backend, reason, _ = await self.router.choose(body, set(), allowed)
        backend.in_flight += 1
        self.router.metrics.in_flight.labels(backend.url).inc()
        self.router.metrics.requests.labels(backend.url, reason).inc()
        return backend


async def start_ext_proc(router: Router, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(EndpointPicker(router), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server
