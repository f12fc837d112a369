"""ragtune: declare fine-tuning, indexing and hybrid retrieval-augmented serving as Kubernetes resources.

Importing this package is cheap and never imports kopf: the workloads import `ragtune.api` too.
"""

GROUP = "ragtune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
__version__ = "0.1.0"
