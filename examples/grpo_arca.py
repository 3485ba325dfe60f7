"""Train a LoRA adapter with ARCA credit (TRL's GRPO, token t of completion i gets advantage A_i * w_i,t) on a
handful of MATH problems, rewarded by math-verify.

    python examples/grpo_arca.py --model_name_or_path tiny --output_dir runs/tiny --max_steps 1 --bf16 false
    python examples/grpo_arca.py --model_name_or_path Qwen/Qwen3-0.6B --output_dir runs/qwen3 --credit_method kl
    python examples/grpo_arca.py --config recipe.yaml  # the same flags as YAML keys (TrlParser)

Flags (`--help`): every `GRPOConfig` flag, the `credit_*` flags of `CreditGRPOConfig`, and TRL's `ModelConfig`
(`--lora_r`, `--lora_alpha`, `--lora_target_modules`, `--dtype`). ARCA compares the policy with its adapter on
and off, so LoRA is always on. `tiny` is a random 2-layer Qwen3 with a character tokenizer, built offline
(`arca.models.tiny`): it runs anywhere and learns nothing. On a machine without a GPU add `--bf16 false`.
"""

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from arca import CreditGRPOConfig, CreditGRPOTrainer
from arca.models.tiny import tiny_model, tiny_tokenizer
from arca.tasks.grading import accuracy_reward

PROBLEMS = [  # (MATH problem, reference answer), graded by math-verify against the completion's last \boxed{}
    (r"What is the value of $\sqrt{36 \times \sqrt{16}}$?", "12"),
    (r"Compute $\dbinom{8}{4}$.", "70"),
    (r"If $2x + 3 = 11$, what is the value of $x$?", "4"),
    (r"What is the greatest common factor of $68$ and $92$?", "4"),
    (r"Simplify $\frac{84}{144}$.", r"\frac{7}{12}"),
    (r"Evaluate $\left\lceil\sqrt{140}\right\rceil$.", "12"),
]


def main(training_args: CreditGRPOConfig, model_args: ModelConfig) -> CreditGRPOTrainer:
    if model_args.model_name_or_path in (None, "tiny"):
        model, tokenizer = tiny_model(), tiny_tokenizer()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": rf"{p} Put the final answer in \boxed{{}}."}] for p, _ in PROBLEMS],
            "answer": [answer for _, answer in PROBLEMS],
        }
    )
    model_args.use_peft = True  # the reference policy is the same model with the adapter off
    trainer = CreditGRPOTrainer(
        model=model,
        reward_funcs=accuracy_reward,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    parser = TrlParser((CreditGRPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
