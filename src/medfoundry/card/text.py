"""The card's fixed statements: the seed models' stance on use, the known failure modes of biomedical
language models, and the seed papers. Facts about models of this kind, true of every run."""

from __future__ import annotations

DIRECT_USE = (
    "Research on biomedical language models: studying what a model learns from biomedical text, scoring and "
    "generating biomedical text in experiments, and comparing training recipes. As with the seed models "
    "(BioMedLM, BioMed-LLaMA, Meditron), generated text is for research purposes only and is not suitable for "
    "production use."
)

DOWNSTREAM_USE = {
    "pretrain": (
        "A starting point for supervised fine-tuning on biomedical tasks (question answering, summarization, "
        "information extraction). A fine-tuned derivative needs its own evaluation before any use."
    ),
    "finetune": (
        "Answering biomedical questions in the chat format it was fine-tuned on, in research settings; "
        "further fine-tuning or alignment for a specific task, with its own evaluation."
    ),
}

OUT_OF_SCOPE = [
    "Clinical decision-making: diagnosis, triage, treatment or dosing decisions about real patients.",
    "Medical advice to patients, carers or the public, or any use where an answer is acted on without review by "
    "a qualified professional.",
    "Production deployment of any kind without further alignment, safety testing and evaluation in the intended "
    "setting.",
    "Generating text presented as authoritative medical or scientific literature.",
]

RISKS = [
    "**Hallucination.** Language models produce fluent text that can be wrong: invented studies, citations, doses, "
    "drug interactions and statistics read as confidently as correct statements. Nothing in training checks "
    "generated statements against evidence.",
    "**Outdated knowledge.** What the model learned is fixed at the date of its training text. Guidelines, drug "
    "approvals and evidence that changed later are not reflected, and the literature it learned from contains "
    "retracted and superseded findings.",
    "**Biases of the biomedical literature.** PubMed and PubMed Central over-represent research from high-income "
    "countries, English-language journals and the populations enrolled in trials; conditions that mostly affect "
    "under-represented groups are covered less. A model trained on this text reproduces these imbalances and "
    "the stereotypes about sex, age, race and other characteristics present in it.",
    "**Benchmarks are narrow.** Multiple-choice exam questions and PubMedQA measure recall and reading on fixed "
    "formats; scores on them do not establish that generated answers are safe or useful for patients or "
    "clinicians.",
    "**Memorization.** A model can reproduce passages of its training text verbatim, including text under licences "
    "that restrict reuse.",
]

SEEDS = {
    "BioMedLM": (
        "BioMedLM (Bolton et al., 2024): a GPT-2-style model with its own biomedical tokenizer, pretrained from "
        "scratch on PubMed abstracts and papers.",
        "@article{bolton2024biomedlm,\n"
        "  title = {BioMedLM: A 2.7B Parameter Language Model Trained On Biomedical Text},\n"
        "  author = {Bolton, Elliot and Venigalla, Abhinav and Yasunaga, Michihiro and Hall, David and "
        "Xiong, Betty and Lee, Tony and Daneshjou, Roxana and Frankle, Jonathan and Liang, Percy and "
        "Carbin, Michael and Manning, Christopher D.},\n"
        "  journal = {arXiv preprint arXiv:2403.18421},\n"
        "  year = {2024}\n"
        "}",
    ),
    "BioMed-LLaMA": (
        "BioMed-LLaMA (Jiang et al., 2023): continued pretraining of LLaMA-7B on PubMed abstracts and papers, "
        "evaluated by log-likelihood on MedQA, MedMCQA and PubMedQA, then instruction-tuned.",
        "@misc{biomedllama,\n"
        "  author = {Jiang, Junfeng and Zhang, Qiang and Aizawa, Akiko and Xu, Renjing},\n"
        "  title = {BioMed-LLaMA: Continuous Pretraining LLaMA with Biomedical Abstracts and Papers},\n"
        "  year = {2023},\n"
        "  publisher = {GitHub},\n"
        "  url = {https://github.com/Coldog2333/BioMed-LLaMA}\n"
        "}",
    ),
    "Meditron": (
        "Meditron (Chen et al., 2023): continued pretraining of Llama 2 on GAP-Replay (guidelines, abstracts, papers "
        "and 1% general-domain replay), decontaminated against its benchmarks, then fine-tuned on them.",
        "@article{chen2023meditron,\n"
        "  title = {MEDITRON-70B: Scaling Medical Pretraining for Large Language Models},\n"
        "  author = {Chen, Zeming and Hern{\\'a}ndez Cano, Alejandro and Romanou, Angelika and Bonnet, Antoine and "
        'Matoba, Kyle and Salvi, Francesco and Pagliardini, Matteo and Fan, Simin and K{\\"o}pf, Andreas and '
        "Mohtashami, Amirkeivan and others},\n"
        "  journal = {arXiv preprint arXiv:2311.16079},\n"
        "  year = {2023}\n"
        "}",
    ),
}

EXAMPLE_PROMPT = "Metformin is a first-line treatment for"
EXAMPLE_QUESTION = "What is the first-line drug treatment for type 2 diabetes?"

# Assumed average power draw of one training process when the card section gives none, by device kind.
ASSUMED_WATTS = {
    "cpu": (65.0, "a desktop or server CPU package under sustained load"),
    "cuda": (400.0, "the rated board power of an NVIDIA A100 SXM GPU"),
    "mps": (30.0, "an Apple-silicon SoC under sustained load"),
}
