"""Model I/O: where a model comes from and how it is read from and written to disk.

Top to bottom, as a load goes (each module imports only those below it):

- :mod:`~slmcompress.io.load`: any source into memory, ready to serve (``load_model``), or a
  checkpoint layer by layer (``open_streaming_model``); :mod:`~slmcompress.io.describe`:
  a checkpoint described without loading it (``slmcompress inspect``);
- :mod:`~slmcompress.io.checkpoint`: a checkpoint read once (``read_checkpoint`` ->
  ``CheckpointInfo``: config, remote-code check, safetensors headers), loaded, saved;
  :mod:`~slmcompress.io.gptq_checkpoint`: what a GPTQ checkpoint must say and hold;
- :mod:`~slmcompress.io.files`: safetensors headers, ``slmcompress.json`` and
  ``quantize_config.json`` (the one writer); :mod:`~slmcompress.io.sources`: built-in
  aliases, the cache, devices, dtypes, GGUF files;
- :mod:`~slmcompress.io.remote_code`: a checkpoint's own code never runs unless opted in.

``load`` and ``describe`` sit above ``streaming`` and ``kernels`` (they open a streamed
model, install serving kernels); the rest sits below them (pyproject.toml's contract).
"""
