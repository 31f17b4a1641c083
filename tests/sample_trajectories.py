"""Hand-built ScienceWorld-style trajectories for masking and training tests."""

from __future__ import annotations

from stepflow.data.trajectory import Provenance, Trajectory, Turn

SYSTEM = (
    "You are a helpful agent that solves tasks in ScienceWorld, a text-based science "
    "simulator. Reply in exactly this format, one action per turn:\n"
    "Thought: <a short reasoning step>\nAction: <one action>"
)


def _traj(
    task_type: str,
    variation: int,
    instruction: str,
    first_obs: str,
    steps: list[tuple[str, str, str]],
    split: str = "u1",
) -> Trajectory:
    """`steps` are (kind, assistant content, observation after it)."""
    turns = [
        Turn(role="system", kind="system", content=SYSTEM),
        Turn(
            role="user",
            kind="instruction",
            content=f"Task: {instruction}\nObservation: {first_obs}",
        ),
    ]
    for kind, content, observation in steps:
        turns.append(
            Turn(role="assistant", kind=kind, content=content, loss=kind != "erroneous_step")
        )
        if observation:
            turns.append(Turn(role="user", kind="observation", content=observation))
    return Trajectory(
        env="scienceworld",
        task_type=task_type,
        variation=variation,
        split=split,
        instruction=instruction,
        turns=turns,
        reward=1.0,
        score=100.0,
        success=True,
        num_steps=len(steps),
        provenance=Provenance(source="synthesis" if split == "u2" else "golden"),
    )


def golden_find_non_living(variation: int = 0) -> Trajectory:
    """A golden find-non-living-thing episode."""
    return _traj(
        "find-non-living-thing",
        variation,
        "Your task is to find a(n) non-living thing. First, focus on the thing. Then, move "
        "it to the red box in the workshop.",
        "This room is called the hallway. In it, you see: a picture, a substance called air. "
        "You also see: A door to the workshop (that is open).",
        [
            (
                "step",
                "Thought: The thing must go to the workshop, so I go there first.\n"
                "Action: go to workshop",
                "Observation: You move to the workshop.",
            ),
            (
                "step",
                "Thought: A battery is not alive, I focus on it.\nAction: focus on battery",
                "Observation: You focus on the battery.",
            ),
            (
                "step",
                "Thought: Now I put the battery in the red box.\nAction: move battery to red box",
                "Observation: You move the battery to the red box. Task completed.",
            ),
        ],
    )


def golden_lifespan(variation: int = 1) -> Trajectory:
    """A golden lifespan-longest-lived episode that ends on an assistant turn."""
    return _traj(
        "lifespan-longest-lived",
        variation,
        "Your task is to find the animal with the longest life span. The animals are in the "
        "'outside' location. Focus on the animal with the longest life span.",
        "This room is called the kitchen. You see: a fridge, a counter. A door to outside.",
        [
            (
                "step",
                "Thought: The animals are outside.\nAction: go to outside",
                "Observation: You see: an elephant, a bee, a parrot.",
            ),
            ("step", "Thought: Elephants live longest.\nAction: focus on elephant", ""),
        ],
    )


def reflected_find_non_living(variation: int = 2) -> Trajectory:
    """A self-reflected episode: an erroneous student step, then the teacher's reflection."""
    return _traj(
        "find-non-living-thing",
        variation,
        "Your task is to find a(n) non-living thing. First, focus on the thing. Then, move "
        "it to the green box in the kitchen.",
        "This room is called the hallway. You see: a door to the kitchen (that is open).",
        [
            (
                "erroneous_step",
                "Thought: I should look at the picture first.\nAction: look at picture",
                "Observation: A picture of a sunny meadow.",
            ),
            (
                "reflection",
                "Reflection: Looking at the picture does not help; the box is in the kitchen.\n"
                "Thought: I go to the kitchen.\nAction: go to kitchen",
                "Observation: You move to the kitchen. You see: a spoon, a green box.",
            ),
            (
                "step",
                "Thought: A spoon is not alive.\nAction: focus on spoon",
                "Observation: You focus on the spoon.",
            ),
            (
                "erroneous_step",
                "Thought: I can eat with the spoon.\nAction: eat spoon",
                "Observation: The spoon is not edible.",
            ),
            (
                "reflection",
                "Reflection: The task asks to move the spoon, not to use it.\n"
                "Thought: I move the spoon to the green box.\nAction: move spoon to green box",
                "Observation: You move the spoon to the green box. Task completed.",
            ),
        ],
        split="u2",
    )


def sample_set() -> list[Trajectory]:
    """A few trajectories of each kind."""
    return [golden_find_non_living(), golden_lifespan(), reflected_find_non_living()]
