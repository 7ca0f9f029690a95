"""Pagoda's Kubernetes operator: LLMDeployment -> pre-warmed engine pods, a Service, autoscaling.

Importing the package registers nothing and reads no environment; the kopf handlers live in
`pagoda_operator.handlers`: `kopf run -m pagoda_operator.handlers --all-namespaces --standalone`.
"""
