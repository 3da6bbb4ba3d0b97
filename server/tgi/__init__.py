"""TGI routes (the text-generation-inference router API) translated to the vLLM OpenAI API of the engines."""
