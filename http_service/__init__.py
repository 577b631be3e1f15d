"""The HTTP server (`sdxl-split serve`): AUTOMATIC1111's /sdapi/v1 and OpenAI's images API in front of the split
engine."""
