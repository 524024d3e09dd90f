"""vlm_judge on a tiny random transformers VLM (LLaVA architecture: CLIP vision tower + Llama, built and saved in the
test, nothing downloaded), in process and through a loopback OpenAI-compatible server that runs the same model
(the role vLLM plays): both scores equal the expected rating computed here from the model's own logits."""

from __future__ import annotations

import base64
import io

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from neighbor_grpo.rewards import build_rewards  # noqa: E402
from neighbor_grpo.rewards.judge import TEMPLATE, judge_messages, pil_images  # noqa: E402
from neighbor_grpo.rewards.protocol import ProtocolError  # noqa: E402
from neighbor_grpo.rewards.server import ServerThread  # noqa: E402

WORDS = ["USER", "ASSISTANT", "The", "image", "was", "generated", "for", "the", "prompt", ":", '"', ".", "How", "well",
         "does", "it", "show", ",", "and", "how", "good", "is", "?", "Rate", "from", "(", ")", "worst", "best", "to",
         "Answer", "with", "number", "only", "a", "cat", "dog", "red", "1", "2", "3", "4", "5"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A random LLaVA (CLIP ViT 16 px, patch 4 + one Llama layer) and its processor, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<image>", "[UNK]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                                                     eos_token="</s>", pad_token="<pad>",
                                                     additional_special_tokens=["<image>"])
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                            patch_size=4, vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1)
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a sharper output layer, so the ratings' probabilities differ clearly between images,
        model.lm_head.weight.mul_(40)  # and one that mostly answers digits (the parsed-answer mode has some to read)
        model.lm_head.weight[[i for t, i in vocab.items() if t not in "12345"]] *= 0.1
    folder = tmp_path_factory.mktemp("tiny-vlm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {"path": folder, "model": model, "processor": processor, "vocab": vocab}


def reference_ratings(tiny_vlm, images, prompts) -> torch.Tensor:
    """sum_k k p(k) / sum_k p(k) over the tokens '1'..'5' at the answer position, one image at a time."""
    processor, model, vocab = tiny_vlm["processor"], tiny_vlm["model"], tiny_vlm["vocab"]
    ratings = torch.arange(1, 6, dtype=torch.float64)
    values = []
    for picture, prompt in zip(pil_images(images), prompts):
        text = processor.apply_chat_template(judge_messages(TEMPLATE, prompt, [1, 5]), add_generation_prompt=True,
                                             tokenize=False)
        with torch.no_grad():
            logits = model(**processor(text=[text], images=[picture], return_tensors="pt")).logits[0, -1]
        p = logits[[vocab[str(k)] for k in range(1, 6)]].double().softmax(dim=0)
        values.append(float((p * ratings).sum()))
    return torch.tensor(values, dtype=torch.float64)


def openai_compatible_app(tiny_vlm):
    """A minimal chat-completions server running the tiny VLM, as vLLM would: data-URL images, one token, its
    top log-probabilities over the whole vocabulary."""
    import fastapi
    from PIL import Image

    processor, model = tiny_vlm["processor"], tiny_vlm["model"]
    app = fastapi.FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        parts = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        content = [{"type": "image"} if p["type"] == "image_url" else p for p in parts]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        with torch.no_grad():
            logits = model(**processor(text=[text], images=[picture], return_tensors="pt")).logits[0, -1]
        log_probs = logits.log_softmax(dim=0)
        top = log_probs.topk(min(int(body.get("top_logprobs", 0)), len(log_probs)))
        tokens = processor.tokenizer.convert_ids_to_tokens(top.indices.tolist())
        best = tokens[0] if tokens else processor.tokenizer.convert_ids_to_tokens(int(log_probs.argmax()))
        entries = [{"token": t, "logprob": float(v)} for t, v in zip(tokens, top.values)]
        return {"object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": best},
                             "logprobs": {"content": [{"token": best, "logprob": entries[0]["logprob"] if entries else 0,
                                                       "top_logprobs": entries}]} if body.get("logprobs") else None,
                             "finish_reason": "length"}]}

    @app.post("/no-logprobs/v1/chat/completions")
    def no_logprobs(body: dict):  # an endpoint started without log-probabilities
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "logprobs": None}]}

    return app


IMAGES = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
PROMPTS = ["a red cat", "a dog", "a cat", "a red dog"]


def test_in_process_judge_scores_the_expected_rating_of_the_models_logits(tiny_vlm):
    judge = build_rewards([{"name": "vlm_judge", "kwargs": {"path": str(tiny_vlm["path"]), "batch_size": 3}}])
    scores = judge.rewards["vlm_judge"](IMAGES, PROMPTS)
    expected = reference_ratings(tiny_vlm, IMAGES, PROMPTS)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-5)  # batched and padded vs one by one
    assert scores.dtype == torch.float32 and 1 <= scores.min() and scores.max() <= 5
    assert expected.max() - expected.min() > 0.05  # the images and prompts really move the rating


def test_endpoint_judge_through_an_openai_compatible_server_gives_the_same_scores(tiny_vlm):
    expected = reference_ratings(tiny_vlm, IMAGES, PROMPTS)
    with ServerThread(openai_compatible_app(tiny_vlm)) as url:
        kwargs = {"base_url": f"{url}/v1", "model": "tiny", "top_logprobs": len(tiny_vlm["vocab"])}
        judge = build_rewards([{"name": "vlm_judge", "kwargs": kwargs}]).rewards["vlm_judge"]
        torch.testing.assert_close(judge(IMAGES, PROMPTS).double(), expected, rtol=0, atol=1e-5)
        answers = build_rewards([{"name": "vlm_judge", "kwargs": {**kwargs, "score_from": "answer"}}])
        parsed = answers.rewards["vlm_judge"](IMAGES, PROMPTS)  # the greedy token, read as a number when it is one
        vocab = {i: t for t, i in tiny_vlm["vocab"].items()}
        for score, picture, prompt in zip(parsed, pil_images(IMAGES), PROMPTS):
            processor = tiny_vlm["processor"]
            text = processor.apply_chat_template(judge_messages(TEMPLATE, prompt, [1, 5]), add_generation_prompt=True,
                                                 tokenize=False)
            with torch.no_grad():
                token = vocab[int(tiny_vlm["model"](**processor(text=[text], images=[picture],
                                                                return_tensors="pt")).logits[0, -1].argmax())]
            assert (float(score) == float(token)) if token in "12345" else bool(score.isnan())
        assert (~parsed.isnan()).sum() >= 2  # most answers are ratings
        broken = build_rewards([{"name": "vlm_judge", "kwargs": {**kwargs, "base_url": f"{url}/no-logprobs/v1"}}])
        with pytest.raises(ProtocolError, match=rf"^vlm_judge {url}/no-logprobs/v1/chat/completions: reply "
                                                r"choices\[0\].logprobs.content\[0\].top_logprobs: expected a list"):
            broken.rewards["vlm_judge"](IMAGES[:1], PROMPTS[:1])


def test_judge_settings_are_checked_in_one_line(tiny_vlm):
    with pytest.raises(ValueError, match="give either path .* or base_url and model"):
        build_rewards([{"name": "vlm_judge", "kwargs": {}}])
    with pytest.raises(ValueError, match=r"ratings must be two or more distinct integers from 0 to 9, got \[1, 10\]"):
        build_rewards([{"name": "vlm_judge", "kwargs": {"path": str(tiny_vlm["path"]), "ratings": [1, 10]}}])
    with pytest.raises(ValueError, match=r"template: only the placeholders \{prompt\}, \{low\} and \{high\} can be filled"):
        build_rewards([{"name": "vlm_judge", "kwargs": {"path": str(tiny_vlm["path"]), "template": "{score}"}}])
    with pytest.raises(ValueError, match="model is required"):
        build_rewards([{"name": "vlm_judge", "kwargs": {"base_url": "http://127.0.0.1:9/v1"}}])
