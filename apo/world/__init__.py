"""The embedded demo world, apart from the library: the synthetic CXR-MAX-format benchmark (synth) and the tiny
Qwen2.5-VL models (tiny)."""
