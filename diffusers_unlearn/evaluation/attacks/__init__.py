"""Recovery attacks: does an erased concept stay erased?

>>> import diffusers_unlearn as du
>>> style_clf, _ = du.minicanvas.load_classifiers()
>>> result = du.evaluation.attack(pipe, "neon lines", "embedding", domain="style", classifier=style_clf, seed=0)
>>> result.plain_accuracy, result.accuracy, result.robust_ua, result.seconds

Kinds (one module each, registered below): ``paraphrase`` (held-out wordings), ``embedding`` (textual-inversion
recovery with frozen weights), ``finetune`` (benign fine-tuning resurgence on a copy), ``rollback`` (each other
request rolled back in turn). A new kind is one module with a config dataclass and an ``Attack`` subclass, plus
one ``register_attack`` line here.
"""

from .base import (
    ATTACKS,
    Attack,
    AttackConfig,
    AttackContext,
    AttackOutcome,
    AttackResult,
    attack,
    build_attack_config,
    register_attack,
)
from .embedding import EmbeddingAttack, EmbeddingAttackConfig
from .finetune import FinetuneAttack, FinetuneAttackConfig
from .paraphrase import ParaphraseAttack, ParaphraseAttackConfig
from .rollback import RollbackAttack, RollbackAttackConfig

register_attack(ParaphraseAttackConfig, ParaphraseAttack)
register_attack(EmbeddingAttackConfig, EmbeddingAttack)
register_attack(FinetuneAttackConfig, FinetuneAttack)
register_attack(RollbackAttackConfig, RollbackAttack)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "AttackContext",
    "AttackOutcome",
    "AttackResult",
    "EmbeddingAttack",
    "EmbeddingAttackConfig",
    "FinetuneAttack",
    "FinetuneAttackConfig",
    "ParaphraseAttack",
    "ParaphraseAttackConfig",
    "RollbackAttack",
    "RollbackAttackConfig",
    "attack",
    "build_attack_config",
    "register_attack",
]
