"""Preference layouts: how a source holds its pairs, detected once from its first row, and every row converted to
TRL's preference form {"prompt", "chosen", "rejected"}: three strings, or three lists of messages, with the row's
"tools" and "chat_template_kwargs" where it has them (rendered by the chat template as TRL 1.16 passes them).

    layout          columns (first row decides)                                  the prompt is
    standard        prompt, chosen, rejected: strings (TRL's text layout, raw)   `prompt`
    conversational  prompt, chosen, rejected: message lists (answers only)       `prompt`
    h4              prompt (text or messages) + chosen/rejected as whole          the conversations' shared turns;
                    conversations (HuggingFaceH4/ultrafeedback_binarized)         `prompt` must match one user turn
    implicit        chosen, rejected only: whole transcripts, text or messages   their shared prefix (hh-rlhf)
                    (also chosen_messages/rejected_messages)
    sharegpt        conversations or messages ({from, value} or {role,           `conversations`
                    content}) + chosen/rejected as a message, a list or a string
    openai          input.messages (+ input.tools) + preferred_output /          `input.messages`
                    non_preferred_output
    question        question or instruction (+ input, history, system) +         a user turn (after history/system)
                    chosen/rejected or response_chosen/response_rejected (orca)
    ms-swift        messages ending with the chosen answer + rejected_response,  `messages` but its last turn
                    or messages + rejected_messages                              (or the shared turns)
    ranked          instruction/prompt + replies ranked best first, or scored    as question; needs ranked_pairs
                    (LLaMA-Factory ranking, Nectar, UltraFeedback completions)
    judged          question + two answers + a winner label (ties), string       as question; needs judged_pairs
                    labels (FastChat, Arena) or the number codes of a published
                    shape (alpaca_eval, PandaLM, Auto-J, SHP, PKU-SafeRLHF,
                    HelpSteer2/3: fastdpo.layouts.graded)

Message content may be a list of typed parts ([{"type": "text", "text"|"value": ...}]): text parts are joined, any
other part is a row error naming it. Role names of sharegpt (human, gpt, observation, function_call) and ms-swift
(tool_call, tool_response) map to TRL's; a call turn becomes an assistant message with tool_calls. A row's `tools`
(a JSON string or a list; OpenAI's input.tools) and `chat_template_kwargs` reach the chat template for the prompt and
both answers, as TRL passes them. The rule every layout keeps: the same conversation gives the same pair, so the
same token ids, whatever layout holds it (tests/unit/test_layouts.py writes one set of conversations in every layout;
tests/unit/test_real_data_2.py checks published shapes against TRL's own preprocessing). column_map only says where the
parts are: mapped text gets the chat template as the question layout's does; only TRL's own text layout (columns
prompt, chosen, rejected, all text) is tokenised raw, as TRL does, and the layout's description says so.

Oddities with a rule (counted, first places listed): two turns of one role in a row merge into one (blank line
between); an empty answer is a pair (the answer is the end of turn alone); chosen identical to rejected gives no
pair. Structural problems (missing fields, wrong types, unknown roles) are row errors with the row's place. Data
that is not pairs (KTO rows, unlabelled answer pairs) is refused once, at detection, saying what would make pairs.
`column_map` reaches what detection cannot: dotted paths (`input.messages`), message keys and role names, with
LLaMA-Factory's dataset_info.json tag names (role_tag, content_tag, user_tag, assistant_tag, system_tag,
observation_tag, function_tag).

The package, one module a question: `messages` (role names, tags, typed parts, merged runs), `toolcalls` (tools,
template keywords and tool calls as TRL passes them), `layout` (the detected Layout and its reading of a row), the
families `pairs`, `ranked`, `graded`, `judged`, `swift`, `not_pairs` (each: detect a row's layout, convert a row),
`column_map` (the recipe's names), `assemble` (one pair from its parts, with the rules above), `detect` (a source's
layout from its first rows). A new family is a module with `detect` and `convert`, listed in `detect.FAMILIES`.
"""

from .assemble import assemble
from .column_map import MAP_KEYS, check_column_map
from .column_map import parse as parse_column_map
from .detect import DETECT_ROWS, FAMILIES, detect, detect_rows, detect_source
from .graded import SHAPES
from .judged import JUDGE_WORDS, LABEL_COLUMNS, TIE_LABELS
from .layout import ANNOTATORS, Layout, NeedsOption, NotPairs, Options, check_codes, get_path, has_path, parse_codes
from .messages import (
    CONTENT_KEYS,
    MERGE_SEPARATOR,
    PART_TEXT_KEYS,
    ROLE_KEYS,
    ROLE_NAMES,
    ROLES,
    TAG_KEYS,
    TAG_ROLES,
    Tags,
    any_text,
    hh_messages,
    holds_text,
    is_message,
    is_messages,
    merge_runs,
    message_extras,
    to_messages,
)
from .pairs import ANSWER_COLUMNS, CONVERSATION_COLUMNS, QUESTION_COLUMNS
from .ranked import RANKED
from .toolcalls import parsed_tools

__all__ = [
    "ANNOTATORS", "ANSWER_COLUMNS", "CONTENT_KEYS", "CONVERSATION_COLUMNS", "DETECT_ROWS", "FAMILIES", "JUDGE_WORDS",
    "LABEL_COLUMNS", "MAP_KEYS", "MERGE_SEPARATOR", "PART_TEXT_KEYS", "QUESTION_COLUMNS", "RANKED", "ROLES",
    "ROLE_KEYS", "ROLE_NAMES", "TAG_KEYS", "TAG_ROLES", "TIE_LABELS", "Layout", "NeedsOption", "NotPairs", "Options",
    "SHAPES", "Tags", "any_text", "assemble", "check_codes", "check_column_map", "detect", "detect_rows",
    "detect_source", "get_path", "has_path", "hh_messages", "holds_text", "is_message", "is_messages", "merge_runs",
    "message_extras", "parse_codes", "parse_column_map", "parsed_tools", "to_messages",
]
