"""Rollout backends behind one interface (`types.Generator`): Hugging Face generation here; an
OpenAI-compatible server client (vLLM, SGLang, `thinkforge serve`) plugs in the same way."""
