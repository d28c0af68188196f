"""Self-instruct data generation against any OpenAI-compatible endpoint (see `lorakit self-instruct`).

Modules: `prompts` (built-in zh/en topics and task types, seed tasks), `client` (async `openai` client
with retries), `parse` (find the task array in a reply), `dedup` (exact and ROUGE-L near-duplicates),
`writer` (resumable append-only JSONL), `run` (the loop, progress and summary).
"""

from lorakit.selfinstruct.config import SelfInstructConfig

__all__ = ["SelfInstructConfig"]
