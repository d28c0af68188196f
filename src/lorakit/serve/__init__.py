"""Front ends over the generation engine: an OpenAI-compatible HTTP API (`api`) and a Gradio page (`webui`)."""
