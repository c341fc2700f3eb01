"""The engine's speculative step (``serve --draft``): every decoding row's last token and its drafts in one pass.

``speculative.py`` holds the drafters, the draft length policy and the rejection rule; this module applies them to
the engine's slots, whose rows run side by side in one right-padded forward pass over a view of the engine's KV
cache (``KVCache.rows``): each row keeps the drafts that verification accepts and its cache length is cut
back to them, exactly as ``speculative.verify_step`` does for ``generate``.
"""

from __future__ import annotations

import torch

from scratchlm.speculative import DraftLength, verify_token


def speculative_step(engine, decoding: list) -> bool:
    """A speculative step of ``engine`` (a ``serve.engine.Engine`` with a drafter): draft for the decoding requests
    whose draft length policy asks, then one forward pass over every decoding row's last token and its drafts;
    each row keeps its accepted drafts (the rejection rule of ``speculative.verify_token``) and its cache is cut
    back to them. Returns False, having done nothing, when no row drafts: the plain step runs instead."""
    cache, max_len = engine.cache, engine.max_len
    rows = max(a.slot for a in engine.slots if a is not None) + 1
    view = cache.rows(0, rows)
    # One right-padded pass: the fullest row (decoding or prefilling) bounds how far any row can draft.
    cap = max_len - 1 - int(view.lengths.max())
    asking, ks = [], []
    for active in decoding:
        seq = active.seq
        if active.ticket.cancelled:
            continue
        if active.policy is None:
            active.policy = DraftLength(engine.draft_tokens, engine.drafter.draft_cost)
        held = int(cache.lengths[active.slot]) + 1  # cached tokens and the last one
        k = active.policy.choose(min(max_len - held, seq.budget - len(seq.output_ids) - 1, cap))
        if k > 0:
            asking.append(active)
            ks.append(k)
    if not asking:
        return False
    # The drafter reads the whole history (prompt lookup) and the tokens the row caches plus the last one (a draft
    # model's own cache follows them): the two differ once a context shift has dropped tokens.
    histories = [a.seq.prompt_ids + a.seq.output_ids for a in asking]
    windows = [a.window() + [a.next_token] for a in asking]
    proposals = engine.drafter.draft([a.slot for a in asking], histories, windows, ks, [a.seq for a in asking])
    drafts = {a.slot: (tokens[:k], qs) for a, k, (tokens, qs) in zip(asking, ks, proposals) if tokens}
    if not drafts:
        return False
    width = 1 + max(len(tokens) for tokens, _ in drafts.values())
    ids = torch.zeros(rows, width, dtype=torch.long, device=engine.device)
    lengths = torch.ones(rows, dtype=torch.long, device=engine.device)
    adapter_ids = [0] * rows
    for active in decoding:
        fed = [active.next_token, *drafts.get(active.slot, ((), None))[0]]
        ids[active.slot, : len(fed)] = torch.tensor(fed)
        lengths[active.slot] = len(fed)
        adapter_ids[active.slot] = active.job.adapter
    engine._select(adapter_ids)
    saved = view.lengths.clone()
    # One row alone (one client): attend one position at a time, as its plain one-token steps do, so that its greedy
    # text is plain decoding's bit for bit on the int4 engine too (``speculative.verify_step``). Several rows decode
    # their plain steps with a mask, which rounds its own way, so there the cost (a call per position and layer)
    # would buy nothing exact.
    hidden = engine.model.hidden_states(ids, view, input_lengths=lengths,
                                        stepwise_attention=rows == 1)  # (rows, width, C)
    view.lengths.copy_(saved)  # idle and prefilling rows keep theirs; decoding rows advance below
    m = engine.metrics
    m.record(m.batch_size.set, len(decoding))
    m.record(m.batch_sizes.observe, len(decoding))
    for active in sorted(decoding, key=lambda a: a.slot):
        if active.ticket.cancelled:
            engine._release(active)
            continue
        tokens, qs = drafts.get(active.slot, ((), None))
        logits = engine.model.logits(hidden[active.slot, : len(tokens) + 1]).float()
        accepted = made = 0
        for i in range(len(tokens) + 1):
            token, ok = verify_token(active.seq, logits[i], tokens[i], qs[i] if qs else None) \
                if i < len(tokens) else (None, False)  # after every draft: one more token, sampled plainly
            engine._accept(active, logits[i], token=token)
            accepted, made = accepted + ok, made + 1
            if not ok or active.seq.finished or active.ticket.cancelled:
                break
        if tokens:
            active.policy.update(len(tokens), accepted)
            m.record(m.draft_tokens.inc, len(tokens))
            m.record(m.accepted_tokens.inc, accepted)
        m.record(m.verify_passes.inc, 1)
        m.record(m.verify_tokens.inc, made)
        if engine.slots[active.slot] is active:  # still running: keep its fed token and accepted drafts
            cache.lengths[active.slot] = saved[active.slot] + 1 + accepted
    return True
