"""`vlm_judge`: a vision-language model rates each image for its prompt (VLM-as-judge, as UnifiedReward-style and
Q-Align-style rewards do).

The judge sees the image and `template` (with the prompt filled in) and answers one rating token. The score is the
expected rating under the judge's next-token probabilities, renormalised over the rating tokens:
score = sum_k k p(k) / sum_k p(k), k in `ratings` (a smooth score: two images the judge would both call "4" still
differ). It runs either

- in process through transformers (`path`: a local folder of an image-text-to-text model with its processor, e.g.
  Qwen2.5-VL-7B-Instruct or Qwen3-VL; `AutoModelForImageTextToText` + `AutoProcessor`), or
- against any OpenAI-compatible chat endpoint (`base_url` + `model`: vLLM, SGLang), images as PNG data URLs, the
  rating from `logprobs`/`top_logprobs` of one generated token, or (`score_from: answer`) the first number of the
  answer when the endpoint gives no log-probabilities.

Both see the same 8-bit image (an upstream judge reads image files), so they agree to float rounding.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from neighbor_grpo.rewards import register_reward
from neighbor_grpo.rewards.model_loading import frozen, import_transformers, parse_dtype, require_path
from neighbor_grpo.rewards.protocol import ProtocolError, png_bytes
from neighbor_grpo.rewards.remote import import_httpx, post_with_retries

TEMPLATE = ('The image was generated for the prompt: "{prompt}". How well does it show the prompt, and how good is '
            'it? Rate it from {low} (worst) to {high} (best). Answer with the number only.')


def pil_images(images: torch.Tensor) -> list:
    """(batch, C, H, W) in [0, 1] -> 8-bit RGB PIL images, what a judge reads from files."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    return [Image.fromarray(p.permute(1, 2, 0).contiguous().numpy()) for p in pixels]


def expected_rating(log_probs: dict[int, float]) -> float:
    """sum_k k p(k) / sum_k p(k) from {rating: log-probability} (ratings absent from the dict carry no mass)."""
    if not log_probs:
        return math.nan
    top = max(log_probs.values())
    weights = {k: math.exp(v - top) for k, v in log_probs.items()}
    return sum(k * w for k, w in weights.items()) / sum(weights.values())


class TransformersJudge:
    """The judge model in this process: one forward pass per image, the rating from the last position's logits."""

    def __init__(self, path: str, ratings: Sequence[int], template: str, batch_size: int, device, dtype: str):
        transformers = import_transformers()
        folder = require_path(path, "vlm_judge model folder", "huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct "
                              "--local-dir models/Qwen2.5-VL-7B-Instruct", folder=True)
        self.processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        model = transformers.AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True)
        self.model = frozen(model, device, parse_dtype(dtype))
        self.ratings, self.template, self.batch_size, self.device = list(ratings), template, batch_size, device
        tokenizer = self.processor.tokenizer
        self.rating_ids = {k: rating_token_ids(tokenizer, k) for k in self.ratings}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pictures, scores = pil_images(images), []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            texts = [self.processor.apply_chat_template(judge_messages(self.template, prompt, self.ratings),
                                                        add_generation_prompt=True, tokenize=False)
                     for prompt in prompts[start:stop]]
            inputs = self.processor(text=texts, images=pictures[start:stop], return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.no_grad():
                logits = self.model(**inputs).logits.float()
            mask = inputs["attention_mask"]
            last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # the last real token, whichever side pads
            log_probs = logits[torch.arange(len(texts)), last].log_softmax(dim=-1).cpu()
            for row in log_probs:
                scores.append(expected_rating({k: float(torch.logsumexp(row[ids], 0))
                                               for k, ids in self.rating_ids.items()}))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def rating_token_ids(tokenizer, rating: int) -> list[int]:
    """The token ids that spell `rating` alone ("4", and " 4" where that is one token too)."""
    ids = {tuple(tokenizer.encode(text, add_special_tokens=False)) for text in (str(rating), f" {rating}")}
    single = sorted(pieces[0] for pieces in ids if len(pieces) == 1)
    if not single:
        raise ValueError(f"vlm_judge: rating {rating} is not one token of this tokenizer; use ratings from 0 to 9")
    return single


def judge_messages(template: str, prompt: str, ratings: Sequence[int], image_url: str | None = None) -> list[dict]:
    """One user turn: the image, then the filled-in template (transformers' content parts, or OpenAI's with a URL)."""
    text = template.format(prompt=prompt, low=min(ratings), high=max(ratings))
    image = {"type": "image"} if image_url is None else {"type": "image_url", "image_url": {"url": image_url}}
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


class EndpointJudge:
    """The judge behind an OpenAI-compatible `POST {base_url}/chat/completions`, one request per image, several
    in flight; the rating from the first generated token's top log-probabilities (or the answer's number)."""

    def __init__(self, base_url: str, model: str, ratings: Sequence[int], template: str, score_from: str,
                 top_logprobs: int, timeout: float, retries: int, backoff: float, token_env: str | None,
                 concurrency: int):
        httpx = import_httpx()
        headers = {"content-type": "application/json"}
        if token_env:
            if not os.environ.get(token_env):
                raise ValueError(f"vlm_judge {base_url}: token_env {token_env!r} is not set in the environment")
            headers["authorization"] = f"Bearer {os.environ[token_env]}"
        self.url = base_url.rstrip("/").removesuffix("/chat/completions") + "/chat/completions"
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.model, self.ratings, self.template, self.score_from = model, list(ratings), template, score_from
        self.top_logprobs, self.retries, self.backoff, self.concurrency = top_logprobs, retries, backoff, concurrency

    def request(self, picture, prompt: str) -> dict:
        url = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode("ascii")
        body = {"model": self.model, "messages": judge_messages(self.template, prompt, self.ratings, url),
                "temperature": 0.0, "max_tokens": 1 if self.score_from == "logprobs" else 16}
        if self.score_from == "logprobs":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body

    def score_one(self, picture, prompt: str) -> float:
        payload = json.dumps(self.request(picture, prompt)).encode()
        reply = post_with_retries(self.client, self.url, payload, self.retries, self.backoff, "vlm_judge")
        field = "message.content" if self.score_from == "answer" else "logprobs.content[0].top_logprobs"
        try:
            choice = reply["choices"][0]
            if self.score_from == "answer":
                return parse_answer(choice["message"]["content"], self.ratings)
            spelled = {str(k): k for k in self.ratings}
            per_rating: dict[int, list[float]] = {}
            for entry in choice["logprobs"]["content"][0]["top_logprobs"]:  # "4" and " 4" both spell 4
                rating = spelled.get(str(entry["token"]).strip())
                if rating is not None:
                    per_rating.setdefault(rating, []).append(float(entry["logprob"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise ProtocolError(f"vlm_judge {self.url}: reply choices[0].{field}: expected "
                                + ("the answer text" if self.score_from == "answer" else
                                   "a list of {token, logprob} (start the server with log-probabilities enabled, or "
                                   "use score_from: answer)")) from None
        # NaN when no rating token is among the top ones: the update is skipped
        return expected_rating({k: float(torch.logsumexp(torch.tensor(v), 0)) for k, v in per_rating.items()})

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pictures = images.detach().float().clamp(0, 1)
        pictures = pictures.expand(-1, 3, -1, -1) if pictures.shape[1] == 1 else pictures  # judges read RGB
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            scores = list(pool.map(self.score_one, pictures, prompts))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def parse_answer(content: object, ratings: Sequence[int]) -> float:
    """The first number in the judge's answer, if it is a rating; NaN otherwise (the update is then skipped)."""
    found = re.search(r"-?\d+(?:\.\d+)?", str(content or ""))
    value = float(found.group()) if found else math.nan
    return value if min(ratings) <= value <= max(ratings) else math.nan


@register_reward("vlm_judge")
def make_vlm_judge(path: str | None = None, base_url: str | None = None, model: str | None = None,
                   ratings: Sequence[int] = (1, 2, 3, 4, 5), template: str = TEMPLATE, score_from: str = "logprobs",
                   top_logprobs: int = 20, batch_size: int = 8, dtype: str = "float32", timeout: float = 120.0,
                   retries: int = 3, backoff: float = 0.5, token_env: str | None = None, concurrency: int = 16,
                   device: str | torch.device = "cpu"):
    """A VLM judge in process (`path`) or behind an OpenAI-compatible endpoint (`base_url` and `model`)."""
    ratings = [int(k) for k in ratings]
    if len(ratings) < 2 or len(set(ratings)) != len(ratings) or not all(0 <= k <= 9 for k in ratings):
        raise ValueError(f"vlm_judge: ratings must be two or more distinct integers from 0 to 9, got {ratings}")
    if score_from not in ("logprobs", "answer"):
        raise ValueError(f"vlm_judge: score_from must be 'logprobs' or 'answer', got {score_from!r}")
    try:
        template.format(prompt="a prompt", low=min(ratings), high=max(ratings))
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"vlm_judge: template: only the placeholders {{prompt}}, {{low}} and {{high}} can be filled "
                         f"(double other braces: {{{{ }}}}); got {type(error).__name__}: {error}") from None
    if (path is None) == (base_url is None):
        raise ValueError("vlm_judge: give either path (a local model folder, run in process) or base_url and model "
                         "(an OpenAI-compatible endpoint)")
    if path is not None:
        return TransformersJudge(path, ratings, template, batch_size, device, dtype)
    if not model:
        raise ValueError(f"vlm_judge {base_url}: model is required (the name the endpoint serves)")
    return EndpointJudge(base_url, model, ratings, template, score_from, top_logprobs, timeout, retries, backoff,
                         token_env, concurrency)
