"""Memory managers behind one interface, chosen by name: `make_memory("every:5")`.

STM policies: first, previous, first+previous, every:N, fifo:K (stm_core.memory.frames).
STRMN: recurrent:K:RULE, RULE in A/B/C/D, and recurrent-i2m:K (stm_core.memory.recurrent).
"""

from __future__ import annotations

from collections.abc import Callable

from stm_core.memory.base import Encoded, Memory
from stm_core.memory.frames import FrameMemory

__all__ = ["Encoded", "Memory", "FrameMemory", "make_memory", "register_policy", "validate_policy"]

# prefix -> builder(args: list[str], network) -> Memory
_BUILDERS: dict[str, Callable[..., Memory]] = {}


def register_policy(prefix: str, builder: Callable[..., Memory]) -> None:
    _BUILDERS[prefix] = builder


def _int_arg(policy: str, args: list[str], minimum: int) -> int:
    if len(args) != 1 or not args[0].isdigit() or int(args[0]) < minimum:
        raise ValueError(f"memory policy {policy!r}: expected an integer >= {minimum} after ':'")
    return int(args[0])


def _no_args(policy: str, args: list[str]) -> None:
    if args:
        raise ValueError(f"memory policy {policy!r} takes no ':' arguments")


def _without_args(pin_annotated: bool, rolling: int) -> Callable[..., Memory]:
    """The builder of a frame-memory policy that takes no ':' arguments."""

    def build(policy: str, args: list[str], network) -> Memory:
        _no_args(policy, args)
        return FrameMemory(pin_annotated, None, rolling)

    return build


register_policy("first", _without_args(True, 0))
register_policy("previous", _without_args(False, 1))
register_policy("first+previous", _without_args(True, 1))
register_policy("every", lambda p, a, net: FrameMemory(True, _int_arg(p, a, 1), 1))
register_policy(
    "fifo", lambda p, a, net: FrameMemory(False, None, _int_arg(p, a, 2) - 1, pin_first_only=True)
)


def make_memory(policy: str, network=None) -> Memory:
    """Build a fresh memory for one object group. `network` supplies STRMN's Fusion Cell."""
    _load_plugins()
    prefix, *args = policy.strip().split(":")
    if prefix not in _BUILDERS:
        raise ValueError(f"unknown memory policy {policy!r}; known: {sorted(_BUILDERS)} (e.g. every:5, fifo:8)")
    return _BUILDERS[prefix](policy, args, network)


def validate_policy(policy: str) -> str:
    """Raise ValueError for a malformed policy without needing a network."""
    _load_plugins()
    prefix, *args = policy.strip().split(":")
    if prefix not in _BUILDERS:
        raise ValueError(f"unknown memory policy {policy!r}; known: {sorted(_BUILDERS)}")
    if prefix.startswith("recurrent"):  # its builder needs the network: check the syntax alone
        from stm_core.memory.recurrent import parse_policy

        parse_policy(policy)
        return policy
    _BUILDERS[prefix](policy, args, None)
    return policy


def _load_plugins() -> None:
    try:  # the STRMN memory registers itself; absent while it is being built
        import stm_core.memory.recurrent  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "stm_core.memory.recurrent":
            raise
