"""HF safetensors -> GGUF: the writer (convert), quantizers (quants), type mixes (recipes), llama.cpp (llamacpp)."""
