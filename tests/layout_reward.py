"""A custom reward (`--reward layout_reward:first_char_parity`) for the layout tests: a random tiny model's
responses then get mixed rewards, hence non-zero advantages, without any training."""


def first_char_parity(solution: str, ground_truth: str) -> float:
    return 1.0 if solution and ord(solution[0]) % 2 == 0 else 0.0
