"""Built-in passes; importing this package registers them (see slmcompress.registry)."""

from slmcompress.passes import eval, quantize_rtn  # noqa: F401
from slmcompress.passes import gptq  # noqa: F401
from slmcompress.passes import prune  # noqa: F401
from slmcompress.passes import bnb  # noqa: F401
from slmcompress.passes import distill  # noqa: F401
