"""Coordinator election (seed 12.3, 17.1): pure functions, no I/O.

* Every agent votes for the highest-ranked *eligible* node it can see: itself
  when its PostgreSQL is up, and every peer whose PostgreSQL and agent passed the
  health check (fewer than ``unhealthy_threshold`` consecutive failures).
* Rank: in star mode the hub first; then higher priority; then the smaller name.
* A node is coordinator when it votes for itself and holds a quorum of votes:
  a majority of all configured nodes when there are more than 2; with 2 nodes
  the survivor self-promotes (quorum 1), but defers to a visible higher-ranked
  peer that votes for itself.
* Each agent casts exactly one vote, so at most one node can hold a majority:
  never more than one coordinator among nodes that can see a majority.
"""


def rank_key(name, priority, mode="mesh", hub=None):
    """Sort key: smaller sorts first = better candidate."""
    return (0 if (mode == "star" and name == hub) else 1, -int(priority), name)


def choose_vote(eligible, mode="mesh", hub=None):
    """The candidate to vote for among ``eligible`` ({name: priority}), or None."""
    if not eligible:
        return None
    return sorted(eligible, key=lambda n: rank_key(n, eligible[n], mode, hub))[0]


def quorum_size(total):
    return 1 if total <= 2 else total // 2 + 1


def votes_for(name, my_name, my_vote, peer_votes):
    """Names of the nodes voting for ``name`` (``peer_votes``: {peer: vote or None})."""
    voters = [my_name] if my_vote == name else []
    voters += sorted(p for p, v in peer_votes.items() if v == name)
    return voters


def startup_eligible(eligible, claimers, unanswered, holding):
    """The candidates an agent may vote for while its *startup hold* runs (``holding``: the first takeover grace
    after the agent started). A restarted agent has forgotten whom it voted for, and its peer health starts from
    nothing: without the hold it could vote for another node at once, while a coordinator it voted for before the
    restart, now out of its sight, still holds a lease resting on that vote. While holding, if some peer's agent
    did not answer this round (``unanswered``), only peers that claim the coordinator role now (``claimers``) are
    candidates, itself never: it votes for the coordinator it sees or abstains. When every peer's agent answered,
    a lease resting on the old vote would show as a claim, and the vote is free."""
    if not holding or not unanswered:
        return dict(eligible)
    return dict((n, p) for n, p in eligible.items() if n in claimers)


def decide(my_name, eligible, peer_votes, total, priorities, mode="mesh", hub=None):
    """One election round from this node's point of view.

    ``eligible``: {name: priority} of eligible nodes (self included when healthy);
    ``peer_votes``: votes published by the peers' agents this round;
    ``priorities``: {name: priority} of every configured node (for tie-breaks).
    Returns dict(vote, is_coordinator, voters, quorum, coordinator).
    """
    vote = choose_vote(eligible, mode, hub)
    quorum = quorum_size(total)
    voters = votes_for(my_name, my_name, vote, peer_votes)
    leader = vote == my_name and len(voters) >= quorum
    if leader and total <= 2:
        for peer, pv in peer_votes.items():
            if pv == peer and rank_key(peer, priorities.get(peer, 0), mode, hub) < rank_key(my_name, priorities.get(my_name, 0), mode, hub):
                leader = False
    coordinator = my_name if leader else None
    if coordinator is None:
        # Who we believe leads: the candidate a quorum of visible votes agrees on.
        tally = {}
        for v in [vote] + list(peer_votes.values()):
            if v:
                tally[v] = tally.get(v, 0) + 1
        for cand, n in tally.items():
            if cand != my_name and n >= quorum:
                coordinator = cand
    return dict(vote=vote, is_coordinator=leader, voters=voters, quorum=quorum, coordinator=coordinator)


class PeerHealth:
    """Consecutive failure counting with a threshold (hysteresis)."""

    def __init__(self, threshold):
        self.threshold = threshold
        self.failures = 0
        self.ever_ok = False

    def record(self, ok):
        if ok:
            self.failures = 0
            self.ever_ok = True
        else:
            self.failures += 1
        return self.healthy

    @property
    def healthy(self):
        return self.ever_ok and self.failures < self.threshold
