"""Gateway mode: the router as an InferencePool endpoint picker, driven by a gRPC client that sends what
Envoy's ext_proc filter sends (request headers, the buffered body, then the response phases)."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from router_testkit import MODEL_NAME, LiveServer, free_port

DESTINATION = "x-gateway-destination-endpoint"


def header_map(**headers: str) -> base_pb2.HeaderMap:
    values = [base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in headers.items()]
    return base_pb2.HeaderMap(headers=values)


def envoy_exchange(
    stub: pb_grpc.ExternalProcessorStub, body: dict[str, object], subset: list[str] | None = None
) -> list[pb.ProcessingResponse]:
    metadata = base_pb2.Metadata()
    if subset is not None:
        metadata.filter_metadata["envoy.lb.subset_hint"].update({DESTINATION + "-subset": subset})
    request_headers = header_map(
        **{":method": "POST", ":path": "/v1/chat/completions", ":authority": "gateway", ":scheme": "http"},
        content_type="application/json",
    )
    messages = [
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=request_headers), metadata_context=metadata
        ),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(body).encode(), end_of_stream=True)),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(**{":status": "200"}))),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"{}", end_of_stream=True)),
    ]
    return list(stub.Process(iter(messages), timeout=30))


def picked(responses: list[pb.ProcessingResponse]) -> str:
    """The endpoint, checked to be the same in the header mutation and the envoy.lb metadata."""
    body_response = responses[1]
    header = body_response.request_body.response.header_mutation.set_headers[0].header
    assert header.key == DESTINATION
    metadata = body_response.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DESTINATION].string_value
    assert header.raw_value.decode() == metadata
    return metadata


@pytest.fixture()
def picker(engines: dict[str, LiveServer], start_router) -> tuple[pb_grpc.ExternalProcessorStub, object]:
    port = free_port()
    router = start_router(engines["a"].base_url, engines["b"].base_url, ext_proc_port=port)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield pb_grpc.ExternalProcessorStub(channel), router
    channel.close()


def test_the_picker_names_a_ready_endpoint_that_serves_the_request(
    engines: dict[str, LiveServer], picker: tuple[pb_grpc.ExternalProcessorStub, object]
) -> None:
    stub, router = picker
    endpoints = {name: engines[name].base_url.removeprefix("http://") for name in "ab"}
    body = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "x" * 80}]}
    responses = envoy_exchange(stub, body)
    assert [r.WhichOneof("response") for r in responses] == [
        "request_headers", "request_body", "response_headers", "response_body"
    ]
    first = picked(responses)
    assert first in endpoints.values()
    # what Envoy does next: send the request there
    assert httpx.post(f"http://{first}/v1/chat/completions", json=body, timeout=60).status_code == 200
    # the next turn of the conversation goes to the same endpoint; a subset hint is obeyed
    body["messages"] += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    assert picked(envoy_exchange(stub, body)) == first
    other = next(e for e in endpoints.values() if e != first)
    assert picked(envoy_exchange(stub, body, subset=[other])) == other
    # nothing eligible in the subset: an immediate 503, as the protocol asks
    refused = envoy_exchange(stub, body, subset=["10.255.0.1:8000"])
    assert refused[-1].immediate_response.status.code == 503
    assert json.loads(refused[-1].immediate_response.body)["error"]["message"]
    # every stream ended: no load is left counted against the endpoints
    assert router.metric("pagoda_router_in_flight_requests") == 0
    assert router.metric("pagoda_router_requests_total", decision="prefix-hit") == 1  # the second turn
