"""Export compressed models to deployment formats (GGUF for llama.cpp)."""
