"""kopf handlers, one module per kind. Importing this package registers them."""

from . import finetunejob, hybridendpoint, runtime, vectorindex  # noqa: F401
