"""Alert evaluation (seed 8.3): warning/critical thresholds on metric values. Pure."""

LEVELS = {"ok": 0, "warning": 1, "critical": 2}


def level_for(value, rule):
    """ok | warning | critical for one value under one rule (None value -> ok)."""
    if value is None:
        return "ok"
    above = rule.get("direction", "above") == "above"
    for level in ("critical", "warning"):
        t = rule.get(level)
        if t is None:
            continue
        if (above and value >= t) or (not above and value <= t):
            return level
    return "ok"


def worst(levels):
    best = "ok"
    for lv in levels:
        if LEVELS.get(lv, 0) > LEVELS[best]:
            best = lv
    return best


def evaluate(rules, samples):
    """Alerts for ``samples`` ({metric: [(labels dict, value)]}); one alert per firing (rule, labels)."""
    out = []
    for rule in rules:
        for labels, value in samples.get(rule["metric"], []):
            lv = level_for(value, rule)
            if lv != "ok":
                out.append(dict(name=rule["name"], metric=rule["metric"], level=lv, value=value, labels=labels,
                                threshold=rule[lv]))
    return out
