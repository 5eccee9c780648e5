"""slmcompress: turn a large language model into a small, deployable one.

Composable passes (Minitron pruning, knowledge distillation, GPTQ/RTN quantization)
chained by YAML recipes; every stage writes a Hugging Face checkpoint and an eval report.
"""

__version__ = "0.1.0"
