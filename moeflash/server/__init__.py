"""The OpenAI / DeepSeek-compatible HTTP server: request models, chat encodings, the FastAPI app."""
