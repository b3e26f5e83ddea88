//! Vision-LLM classifiers: providers, prompts, parsing, filtering, caching.
