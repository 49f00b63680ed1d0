"""The DLQ handler's Prometheus metrics."""

from prometheus_client import Counter

DEAD_LETTERS = Counter(
    "cairn_dead_letters_total",
    "Dead letters recorded in task_errors (each once, however often it is delivered)",
    ["reason", "source_queue", "kind"],
)
DEAD_LETTER_DUPLICATES = Counter(
    "cairn_dead_letter_redeliveries_total", "Dead letters delivered again after they were recorded"
)


def count_recorded(document: dict) -> None:
    DEAD_LETTERS.labels(
        str(document.get("reason") or "unknown"), str(document.get("source_queue") or "unknown"), str(document.get("kind") or "unknown")
    ).inc()


REPLAY_COMMANDS = Counter(
    "cairn_dead_letter_commands_total",
    "Replay and discard commands handled, by what came of them (dispatched, discarded, refused, already_done)",
    ["action", "result"],
)
REPLAY_OUTCOMES = Counter(
    "cairn_dead_letter_replays_total", "Replays settled, by outcome (succeeded, failed_again)", ["outcome"]
)
