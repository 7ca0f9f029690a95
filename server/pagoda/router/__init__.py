"""`pagoda router`: an OpenAI-API proxy that routes each request to the engine replica most likely to hold
its prompt prefix in KV cache without overloading it, holds requests while no replica is ready (scale from
zero), and stops sending to a replica the moment it leaves the set or turns unready.

policies.py  pure filter -> score -> pick functions (prefix hashing, bounded loads)
backends.py  the replica set: readiness polls, ejection, cheap rate-limited load scrapes
discovery.py the replica set from the EndpointSlices of the engines' headless Service
metrics.py   pagoda_router_* Prometheus metrics
proxy.py     the aiohttp server: streaming passthrough, retries, holding
extproc.py   gateway mode: the same choices as an Envoy ext-proc endpoint picker (InferencePool)
main.py      flags and the process
"""
