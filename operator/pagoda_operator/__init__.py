"""Pagoda's Kubernetes operator: LLMDeployment -> pre-warmed engine pods, a Service, autoscaling.

Importing the package registers the kopf handlers:
`kopf run -m pagoda_operator --all-namespaces --standalone`.
"""

from pagoda_operator import handlers  # noqa: F401  (registers the kopf handlers)
