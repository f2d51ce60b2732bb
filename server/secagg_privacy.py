"""What privacy.json says about secure aggregation: the trust model in plain words and, for distributed DP,
the Skellam (or distributed discrete Gaussian) accounting over the rounds actually released, with the number
of clients that actually survived.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from privacy.skellam import epsilon_curve

if TYPE_CHECKING:
    from server.privacy_records import PrivacyTracker
    from server.secagg import SecureRounds


MECHANISMS = {
    "skellam": "Skellam (Agarwal, Kairouz, Liu 2021), RDP converted by dp_accounting",
    "discrete-gaussian": "distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, Proposition 14), RDP "
                         "converted by dp_accounting",
}


def _noise_words(secure: SecureRounds) -> str:
    if secure.plan is not None and secure.plan.noise == "discrete-gaussian":
        return "discrete Gaussian noise"
    return "Skellam noise"


def trust_model(secure: SecureRounds, modes: frozenset[str]) -> str:
    t = secure.threshold
    words = (
        "Secure aggregation (SecAgg+): the server is trusted to follow the protocol but not to look away "
        "(honest-but-curious). Each round it learns only the sum of the updates of the clients that survived "
        f"(at least {t}; fewer and the round releases nothing) and who took part, never one client's update, "
        f"as long as fewer than {t} of any client's share holders collude with it. A server colluding with "
        f"{t} or more of a client's share holders can rebuild that client's masks and see its update; "
        "colluding clients learn nothing beyond the sum and their own inputs. Masks come from ECDH key "
        "agreement and AES-CTR; shares are Shamir shares sealed with authenticated encryption.")
    if "user" in modes:
        words += (
            " Distributed DP: every client clips its whole update, rotates, scales and rounds it, and adds its "
            f"own share of {_noise_words(secure)}, sized so that any {t} survivors' noise already sums to the full "
            "noise: the server never sees an un-noised sum. Epsilon counts the clients that actually survived "
            "each round. 'epsilon' gives no credit for client sampling: the server chose the sample, so it gets "
            "no amplification. 'epsilon_amplified' credits Poisson client sampling and holds only against "
            "those who see the released models but not who was sampled. Clients colluding with the server can "
            "remove their own noise shares: with k of n survivors colluding, the noise left is (n-k)/"
            f"{t} of the calibrated variance, a weaker guarantee once n-k < {t}.")
    if "sample" in modes:
        words += (
            " Sample-level DP-SGD runs on each client as without SecAgg and its epsilon (sample_level) is "
            "unchanged: SecAgg adds that the server sees only the sum of the clients' updates, and no epsilon "
            "is claimed for that.")
    return words


def secure_sections(secure: SecureRounds, tracker: PrivacyTracker) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(privacy.json's secure_aggregation section, its user_level section or None)."""
    dp = tracker.dp
    section: dict[str, Any] = {
        "protocol": "SecAgg+ (Bell et al., 2020) over Flower custom actions",
        "trust_model": trust_model(secure, dp.modes),
        "threshold": secure.threshold,
        "shares": secure.cfg.shares,
        "bits": secure.cfg.bits,
        "survivors_per_round": list(secure.survivors_per_round),
        "distributed_dp": None,
    }
    if secure.plan is None:
        return section, None
    plan, n = secure.plan, list(secure.survivors_per_round)
    plain = epsilon_curve(plan, n, dp.delta)
    amplified = (epsilon_curve(plan, n, dp.delta, sample_rate=tracker.fraction)
                 if dp.client_sampling == "poisson" else None)
    section["distributed_dp"] = {
        "mechanism": MECHANISMS[plan.noise],
        **plan.as_dict(),
        "epsilon": plain[-1] if plain else 0.0,
        "epsilon_per_round": plain,
        "epsilon_amplified": (amplified[-1] if amplified else 0.0) if amplified is not None else None,
        "amplification": ("Poisson client sampling at rate q (Zhu & Wang 2019 bound): not valid against the "
                          "server" if amplified is not None else "none: fixed-size sampling"),
    }
    user = {
        "accountant": "rdp", "noise_multiplier": dp.user_noise_multiplier, "clipping_norm": dp.user_clipping_norm,
        "client_sampling": dp.client_sampling, "client_sampling_rate": tracker.fraction,
        "num_clients": tracker.num_clients, "epsilon_per_round": plain, "epsilon": plain[-1] if plain else 0.0,
        "epsilon_pld": None, "clipping": dp.user_clipping,
    }
    return section, user
