"""Request prompts for self-instruct: built-in topics and task types (zh/en), or seed tasks from a file.

Each request samples a few topics and task types (or a few seed tasks shown as examples) and asks for
K diverse tasks as a JSON array of {"instruction", "input", "output"} objects.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lorakit.data import parse_record
from lorakit.data.readers import iter_records
from lorakit.errors import DataError, DataErrors

TOPICS = {
    "en": [
        "cooking", "personal finance", "travel", "physics", "chemistry", "biology", "astronomy", "history",
        "geography", "literature", "poetry", "music", "film", "painting", "architecture", "programming",
        "databases", "mathematics", "statistics", "economics", "law", "medicine", "nutrition", "fitness",
        "psychology", "philosophy", "education", "parenting", "gardening", "pets", "climate", "energy",
        "transportation", "sports", "games", "fashion", "marketing", "careers", "email writing",
        "social media", "languages and grammar", "ethics", "small business", "home repair", "space exploration",
    ],
    "zh": [
        "烹饪", "个人理财", "旅游", "物理", "化学", "生物", "天文", "历史", "地理", "文学", "诗词", "音乐",
        "电影", "绘画", "建筑", "编程", "数据库", "数学", "统计", "经济", "法律", "医学", "营养", "健身",
        "心理学", "哲学", "教育", "育儿", "园艺", "宠物", "气候", "能源", "交通", "体育", "游戏", "时尚",
        "市场营销", "职业发展", "写邮件", "社交媒体", "汉语语法", "成语", "中医", "茶文化", "节日习俗",
    ],
}

TASK_TYPES = {
    "en": [
        "open question answering", "brainstorming", "classification", "summarization", "rewriting",
        "translation", "information extraction", "step-by-step reasoning", "arithmetic word problem",
        "code writing", "code explanation", "creative writing", "recommendation", "comparison",
        "fill in the blank", "sentiment analysis", "letter or email drafting", "definition",
        "pros and cons", "planning",
    ],
    "zh": [
        "开放式问答", "头脑风暴", "分类", "摘要", "改写", "翻译", "信息抽取", "逐步推理", "数学应用题", "写代码",
        "解释代码", "创意写作", "推荐", "比较", "填空", "情感分析", "写信或邮件", "名词解释", "利弊分析", "制定计划",
    ],
}

_TEMPLATES = {
    "en": (
        "Write {k} diverse tasks that an AI assistant could be asked to do, together with a good answer "
        "to each.\n{context}\n"
        "Requirements:\n"
        "1. Vary the wording: do not start two instructions with the same verb.\n"
        "2. Mix question, command and request styles; make each task something a text-only assistant can "
        "do.\n"
        "3. The instruction is one or two sentences. About half of the tasks need an \"input\" (a concrete "
        "text, list, code or data of at most 100 words); for the others \"input\" is the empty string.\n"
        "4. The \"output\" is a correct, complete answer of at most 150 words.\n"
        "5. Write in English.\n"
        "Reply with only a JSON array of {k} objects, each with the string keys \"instruction\", \"input\" "
        "and \"output\"."
    ),
    "zh": (
        "请写出 {k} 个多样的、可以交给AI助手完成的任务，并为每个任务写出一个好的回答。\n{context}\n"
        "要求：\n"
        "1. 措辞要多样，不要让两条指令以同一个动词开头。\n"
        "2. 混合使用提问、命令和请求等句式；每个任务都应是纯文本助手能够完成的。\n"
        "3. 指令为一到两句话。大约一半的任务需要\"input\"（一段具体的文本、列表、代码或数据，不超过100字）；"
        "其余任务的\"input\"为空字符串。\n"
        "4. \"output\"是正确、完整的回答，不超过150字。\n"
        "5. 使用中文。\n"
        "只回复一个包含 {k} 个对象的JSON数组，每个对象有字符串键\"instruction\"、\"input\"和\"output\"。"
    ),
}
_TOPIC_LINE = {"en": "Topics to cover: {topics}.\nTask types to include: {types}.",
               "zh": "涵盖这些主题：{topics}。\n包含这些任务类型：{types}。"}
_SEED_LINE = {"en": "Here are examples of tasks (write new ones that are different from these):\n{examples}",
              "zh": "以下是一些任务示例（请写出与它们不同的新任务）：\n{examples}"}
_SEP = {"en": ", ", "zh": "、"}


@dataclass
class SeedTask:
    """One seed task: instruction, input and output."""

    instruction: str
    input: str
    output: str

    def as_dict(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


def load_topics(path: str | Path) -> list[str]:
    """One topic per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "no such topics file")
    try:
        topics = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(p, None, None, f"invalid UTF-8 ({e.reason})") from None
    if not topics:
        raise DataError(p, None, None, "holds no topics (expected one per line)")
    return topics


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Alpaca records, or Self-Instruct records (`instruction` + `instances: [{input, output}]`)."""
    tasks: list[SeedTask] = []
    errors: list[DataError] = []
    for item in iter_records(path):
        if isinstance(item, DataError):
            errors.append(item)
            continue
        line, obj = item
        if isinstance(obj, dict) and "instances" in obj:
            inst = obj["instances"]
            if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
                errors.append(DataError(path, line, "instances", "must be a non-empty list of objects"))
                continue
            obj = {"instruction": obj.get("instruction"), "input": inst[0].get("input", ""),
                   "output": inst[0].get("output")}
        try:
            ex = parse_record(obj, path, line)
        except DataError as e:
            errors.append(e)
            continue
        if not ex.is_alpaca:
            errors.append(DataError(path, line, None, "seed tasks must be alpaca (instruction/input/output) records"))
            continue
        tasks.append(SeedTask(ex.instruction or "", ex.input or "", ex.output or ""))
    if errors:
        raise DataErrors(errors)
    if not tasks:
        raise DataError(path, None, None, "holds no seed tasks")
    return tasks


class PromptBuilder:
    """Builds one request prompt per call, sampling topics/task types or seed tasks with its own RNG."""

    def __init__(self, language: str, per_request: int, *, topics: list[str] | None = None,
                 seed_tasks: list[SeedTask] | None = None, seed: int | None = None,
                 topics_per_request: int = 3, types_per_request: int = 3, examples_per_request: int = 3):
        self.language = language
        self.k = per_request
        self.topics = topics or TOPICS[language]
        self.types = TASK_TYPES[language]
        self.seed_tasks = seed_tasks
        self.rng = random.Random(seed)
        self.n_topics, self.n_types, self.n_examples = topics_per_request, types_per_request, examples_per_request

    def build(self) -> str:
        lang = self.language
        if self.seed_tasks:
            picked = self.rng.sample(self.seed_tasks, min(self.n_examples, len(self.seed_tasks)))
            examples = json.dumps([t.as_dict() for t in picked], ensure_ascii=False, indent=1)
            context = _SEED_LINE[lang].format(examples=examples)
        else:
            topics = self.rng.sample(self.topics, min(self.n_topics, len(self.topics)))
            types = self.rng.sample(self.types, min(self.n_types, len(self.types)))
            context = _TOPIC_LINE[lang].format(topics=_SEP[lang].join(topics), types=_SEP[lang].join(types))
        return _TEMPLATES[lang].format(k=self.k, context=context)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.build()}]
