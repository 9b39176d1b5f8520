"""Role placement: which role runs in which processes, and which process answers which actor rank.

A role either has pods of its own, `replicas` of them with `processes_per_pod` trainer processes
each (its world: replicas x processes_per_pod ranks, rank = pod index x processes_per_pod + local
rank), or is colocated into another role's processes (`colocate_with`). The rules below are checked once, here: by the operator's
parse_spec() (paths like `roles[1].colocateWith`), the trainer config (`roles.critic.colocate_with`)
and the trainer's bridge (which computes ranks from the same placements).

Actor rank i is served by rank i mod n of each role with pods (n: its ranks), so a serving role may
have fewer ranks than the actor (each of its ranks then serves several actor ranks in turn), never
more (its extra ranks would idle and hang their world).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rlhf_contract.algorithms import ROLE_NAMES


@dataclass(frozen=True)
class Placement:
    """How many pods and processes a role has and whose processes it runs in ('' = its own pods)."""

    replicas: int
    colocate_with: str = ""
    processes_per_pod: int = 1

    @property
    def ranks(self) -> int:
        """Processes of the role's own world: replicas x processes_per_pod."""
        return self.replicas * self.processes_per_pod


def _count(p: Placement) -> str:
    """A role's ranks for messages: "2" while each pod runs one process, else "2 x 4 = 8"."""
    return str(p.ranks) if p.processes_per_pod == 1 else f"{p.replicas} x {p.processes_per_pod} = {p.ranks}"


def _ranks_words(p: Placement) -> str:
    """"replicas (2)" while each pod runs one process, else "ranks (replicas x processesPerPod: 2 x 4 = 8)"."""
    if p.processes_per_pod == 1:
        return f"replicas ({p.replicas})"
    return f"ranks (replicas x processesPerPod: {_count(p)})"


Placements = Mapping[str, Placement]
# (role, field, problem); field is "colocate_with", "replicas" or "processes_per_pod" ("" for the job).
RoleProblem = tuple[str, str, str]


def host_role(role: str, placements: Placements) -> str:
    """The role whose processes run `role` (itself unless colocated)."""
    return placements[role].colocate_with or role


def pod_roles(placements: Placements) -> tuple[str, ...]:
    """Roles with pods of their own, in the order given."""
    return tuple(name for name, p in placements.items() if not p.colocate_with)


def colocated_into(placements: Placements, host: str) -> tuple[str, ...]:
    """Roles served inside `host`'s processes, in the order given."""
    return tuple(name for name, p in placements.items() if p.colocate_with == host)


def colocation_problems(roles: Sequence[tuple[str, Placement]]) -> list[tuple[int, str]]:
    """(index, problem) for every colocate_with that does not name another role of the job with pods
    of its own (no chains); the actor always has pods of its own."""
    by_name = dict(roles)
    problems = []
    for i, (name, placement) in enumerate(roles):
        host = placement.colocate_with
        if not host:
            continue
        if name == "actor":
            problem = "must be unset on the actor: the actor needs pods of its own"
        elif host == name:
            problem = "must name another role, not the role itself"
        elif host not in by_name:
            problem = f"must name a role of this job ({', '.join(by_name)})"
        elif by_name[host].colocate_with:
            problem = f"must name a role with pods of its own ({host!r} is itself colocated)"
        else:
            continue
        problems.append((i, f"{problem} (got {host!r})"))
    return problems


def replica_problems(roles: Sequence[tuple[str, Placement]]) -> list[tuple[int, str, str]]:
    """(index, field, problem) for every role with pods that has more ranks than the actor. The field is
    "replicas" when its pods alone outnumber the actor's ranks, else "processes_per_pod" (its pods would
    fit with fewer processes each)."""
    actors = dict(roles).get("actor")
    if actors is None:
        return []
    return [
        (i, "replicas" if p.replicas > actors.ranks else "processes_per_pod",
         f"must be at most the actor's {_ranks_words(actors)}: each rank of a role with pods serves "
         f"actor ranks (got {_count(p)})")
        for i, (name, p) in enumerate(roles)
        if name != "actor" and not p.colocate_with and p.ranks > actors.ranks
    ]


def batch_problem(actor: Placement, batch_size: int) -> str | None:
    """Every actor rank takes an equal share of the global batch."""
    if batch_size % actor.ranks:
        return (f"must be divisible by the actor's {_ranks_words(actor)}: every actor rank takes an "
                f"equal share (got {batch_size})")
    return None


def problems(roles: Sequence[tuple[str, Placement]]) -> list[RoleProblem]:
    """(role, field, problem) for every layout rule broken, the actor's presence included."""
    names = [name for name, _ in roles]
    out: list[RoleProblem] = []
    if "actor" not in names:
        out.append(("actor", "", "every job needs an actor"))
    out.extend((names[i], "colocate_with", p) for i, p in colocation_problems(roles))
    out.extend((names[i], field, p) for i, field, p in replica_problems(roles))
    return out


def bridge_ranks(placements: Placements) -> dict[tuple[str, int], int]:
    """(role, role rank) -> bridge rank for every process of the roles with pods of their own, actor
    first; role ranks count processes (pod index x processes_per_pod + local rank).
    ValueError when the placements break a rule (the trainer checks them at startup first)."""
    broken = problems(list(placements.items()))
    unknown = sorted(set(placements) - set(ROLE_NAMES))
    if unknown:
        raise ValueError(f"roles: unknown role(s) {unknown}; expected {list(ROLE_NAMES)}")
    if broken:
        role, key, problem = broken[0]
        raise ValueError(f"roles.{role}{'.' + key if key else ''}: {problem}")
    ranks: dict[tuple[str, int], int] = {}
    for role in ROLE_NAMES:
        placement = placements.get(role)
        if placement is None or placement.colocate_with:
            continue
        for index in range(placement.ranks):
            ranks[(role, index)] = len(ranks)
    return ranks


def serving_rank(role: str, actor_rank: int, placements: Placements) -> tuple[str, int]:
    """Which process (host role, host rank) answers `actor_rank`'s requests for `role`."""
    host = host_role(role, placements)
    return host, actor_rank % placements[host].ranks


def served_actor_ranks(host: str, host_rank: int, placements: Placements) -> list[int]:
    """The actor ranks a serving process answers, in the order it answers them."""
    actors = placements["actor"].ranks
    return [i for i in range(actors) if i % placements[host].ranks == host_rank]
