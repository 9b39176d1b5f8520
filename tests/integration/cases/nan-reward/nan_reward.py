# A rule reward that cannot score some responses and says so with NaN (as a parser/judge failing would).

def score(prompts, responses, answers):
    out = []
    for i, r in enumerate(responses):
        out.append(float("nan") if i == 0 else (1.0 if any(c.isdigit() for c in r) else 0.0))
    return out
