"""Built-in passes; importing this package registers them (see slmcompress.registry)."""

from slmcompress.passes import (  # noqa: F401
    bnb,  # noqa: F401
    distill,  # noqa: F401
    evaluate,  # noqa: F401
    export_gguf,  # noqa: F401
    gptq,  # noqa: F401
    prune,  # noqa: F401
    quantize_rtn,
)
