"""Code both services share: model resolution, prompt files, the embedding cache, jobs, protocol, memory."""
