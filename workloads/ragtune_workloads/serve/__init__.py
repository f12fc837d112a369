"""The serving workload of a HybridEndpoint: a Ray Serve application with an OpenAI-compatible API.

Three deployments: `Ingress` (HTTP, auth, routing, prompts), `Retriever` (query embedding + vector search of the
active index version, cached per version) and `Generator` (vLLM, or transformers + peft, with the adapter).
`app.build_app` builds it from the endpoint's `ServeConfig`; `python -m ragtune_workloads.serve` runs it in one
process tree (the Deployment runtime), KubeRay runs the same import path as a RayService.
"""
