"""Multi-turn rollouts with tools: the policy writes `<tool_call>`s, the tools answer, the policy goes on.

A rollout row is one conversation of up to --max_turns policy turns. Each turn is sampled by
model.sampling.sample_responses from the whole transcript so far; when the turn ends with its stop token
and holds tool calls (tools.parse_tool_calls), each call runs (tools.ToolRunner: a timeout, a cut output,
errors as messages) and the chat template's own text for the results and the next generation prompt is
appended. That text is in the sequence the forwards read but is not the policy's: `action_mask` is 1 on
the sampled tokens only, and the trainer keeps the policy loss, the KL, the entropy and the critic's
targets to those (docs/tools.md).

The template text is found by rendering the conversation with a placeholder in place of the policy's
turn and keeping what follows it: the policy's own tokens are never decoded and re-tokenised, so the
log-probs of the update are those of exactly the tokens sampled.
"""
import json
from dataclasses import dataclass

import torch

from model.sampling import sample_responses
from tools import parse_tool_calls
from trainer_utils import InputError

PLACEHOLDER = "@@policy-turn@@"  # stands for the policy's turn while the template renders what follows it


@dataclass
class ToolRollout:
    """What sample_with_tools gives for B rows: [B, R] right-padded over every turn and tool result."""
    response_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] 1 on every real token: the policy's and the template's
    action_mask: torch.Tensor  # [B, R] 1 on the policy's own (sampled) tokens only
    logprobs: torch.Tensor  # [B, R] the sampler's log-probs of its tokens, 0 elsewhere
    has_eos: torch.Tensor  # [B] bool: the last turn ended with a stop token (not cut at --max_gen_len)
    transcripts: list  # B lists of messages after the prompt: assistant turns and tool results, in order
    unfinished: torch.Tensor  # [B] bool: still calling tools at the last turn
    tool_calls: torch.Tensor  # [B] calls made (run or answered with an error)
    tool_errors: torch.Tensor  # [B] calls answered with an error (bad call, unknown tool, raised, timed out)


def render(tokenizer, messages, tools, template_kwargs, add_generation_prompt=True):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         tools=tools or None, **template_kwargs)


def continuation_ids(tokenizer, history, results, tools, template_kwargs, stop_text):
    """Token ids of the template text between the policy's stop token (which it sampled) and its next turn:
    the tool results `results` and the next generation prompt, for a conversation `history` (prompt and
    earlier turns). None when the template does not close an assistant turn with `stop_text`."""
    text = render(tokenizer, history + [{"role": "assistant", "content": PLACEHOLDER}] + results, tools,
                  template_kwargs)
    after = text[text.rindex(PLACEHOLDER) + len(PLACEHOLDER):]
    if not after.startswith(stop_text):
        return None
    return tokenizer(after[len(stop_text):], add_special_tokens=False)["input_ids"]


def check_tool_template(tokenizer, tools, template_kwargs, stop_texts, where):
    """Stop before any work when the chat template cannot carry a tool conversation: it must list the tools
    it is given (tools=), ask for calls as `<tool_call>` JSON (the format tools.parse_tool_calls reads: Qwen's,
    MiniMind-3's, Hermes'), render a `tool` message, and close an assistant turn with a stop token."""
    name = tools[0]["function"]["name"]
    user = [{"role": "user", "content": "Q"}]
    listed = render(tokenizer, user, tools, template_kwargs)
    if name not in listed:
        raise InputError(f"{where}: the chat template does not render tools= (the tool {name!r} is not in the "
                         f"prompt); tool use needs a template with tool support (Qwen2.5/3, minimind-3, Hermes)")
    if "<tool_call>" not in listed:
        raise InputError(f"{where}: the chat template does not ask for <tool_call>{{json}}</tool_call> calls, the "
                         f"only format this trainer parses (Qwen's, minimind-3's, Hermes'); its tool prompt: "
                         f"{listed[:300]!r}")
    result = [{"role": "tool", "name": name, "content": "RESULT-7319"}]
    after = render(tokenizer, user + [{"role": "assistant", "content": PLACEHOLDER}] + result, tools, template_kwargs)
    after = after[after.rindex(PLACEHOLDER) + len(PLACEHOLDER):]
    if "RESULT-7319" not in after:
        raise InputError(f"{where}: the chat template does not render a 'tool' message after an assistant turn")
    if not any(after.startswith(s) for s in stop_texts):
        raise InputError(f"{where}: the chat template ends an assistant turn with {after[:20]!r}, not with a stop "
                         f"token the policy generates ({', '.join(map(repr, stop_texts))})")


def is_error(result):
    """Whether a tool's answer is an error message ({"error": ...})."""
    try:
        return isinstance(json.loads(result), dict) and "error" in json.loads(result)
    except ValueError:
        return False


def left_padded(sequences, pad_token_id, device):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):], mask[row, width - len(s):] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def right_padded(rows, value, dtype, device):
    width = max(max((len(r) for r in rows), default=0), 1)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out.to(device)


@torch.no_grad()
def sample_with_tools(model, tokenizer, prompt_ids, prompt_mask, chats, tools, template_kwargs, runner, max_turns,
                      max_new_tokens, stop_ids, **sampling):
    """Up to `max_turns` policy turns per row, each of up to `max_new_tokens` tokens, with the tool calls of
    every turn but the last run by `runner` (tools.ToolRunner) between them. `chats`: each row's prompt
    messages; `tools`, `template_kwargs`: how its prompt was rendered (its tool schemas and thinking switch).
    A row stops at a turn without a tool call, at a turn cut by the length limit, or after its last turn
    (`unfinished` if that turn still called tools). Rows finish at different turns; each turn samples only
    the rows still going, from their whole transcript (one prefill, then cached decoding). `sampling`:
    sample_responses' temperature, top_k, top_p, greedy. Returns a ToolRollout."""
    B, device, pad = len(chats), prompt_ids.device, tokenizer.pad_token_id
    stop_list = torch.as_tensor(stop_ids).reshape(-1).tolist()
    prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    response, action, logps = ([[] for _ in range(B)] for _ in range(3))
    transcripts = [[] for _ in range(B)]
    has_eos, unfinished, calls, errors = ([0] * B for _ in range(4))
    active = list(range(B))
    for turn in range(max_turns):
        if not active:
            break
        ids, mask = left_padded([prompts[i] + response[i] for i in active], pad, device)
        new_ids, new_mask, new_logps = sample_responses(model, ids, mask, max_new_tokens, stop_ids, pad, **sampling)
        lengths, new_ids, new_logps = new_mask.sum(1).tolist(), new_ids.tolist(), new_logps.tolist()
        going = []
        for j, i in enumerate(active):
            tokens = new_ids[j][:lengths[j]]
            response[i] += tokens
            action[i] += [1] * len(tokens)
            logps[i] += new_logps[j][:lengths[j]]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            transcripts[i].append({"role": "assistant", "content": text})
            has_eos[i] = int(bool(tokens) and tokens[-1] in stop_list)
            found = parse_tool_calls(text)
            if not found or not has_eos[i]:
                continue
            if turn == max_turns - 1:
                unfinished[i] = 1
                continue
            results = [{"role": "tool", "name": call.get("name") or "", "content": runner.run(call)} for call in found]
            history = chats[i] + transcripts[i][:-1]
            more = continuation_ids(tokenizer, history, results, tools[i], template_kwargs[i],
                                    tokenizer.decode(tokens[-1:]))
            if more is None:  # ended with a stop token that does not close a turn (e.g. <|endoftext|>): it is over
                continue
            calls[i] += len(found)
            errors[i] += sum(is_error(r["content"]) for r in results)
            transcripts[i] += results
            response[i] += more
            action[i] += [0] * len(more)
            logps[i] += [0.0] * len(more)
            going.append(i)
        active = going
    response_ids = right_padded(response, pad, torch.long, device)
    as_tensor = lambda v: torch.tensor(v, device=device)  # noqa: E731
    return ToolRollout(response_ids=response_ids,
                       response_mask=right_padded([[1] * len(r) for r in response], 0, torch.long, device),
                       action_mask=right_padded(action, 0, torch.long, device),
                       logprobs=right_padded(logps, 0.0, torch.float32, device),
                       has_eos=as_tensor(has_eos).bool(), transcripts=transcripts,
                       unfinished=as_tensor(unfinished).bool(), tool_calls=as_tensor(calls),
                       tool_errors=as_tensor(errors))
