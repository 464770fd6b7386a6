"""The numerical constants that the Python reference code and the C++ kernels share: this file is their one
source.  The Python modules import them from here; the kernel build writes them into a generated header,
``bmrs_constants.h`` (:func:`header_text`), which the kernel sources include, and hashes that text into the
build key, so that changing a value here rebuilds the kernels with it.

Examples:
    >>> from bmrs._kernels.constants import FAR_END, header_text
    >>> f"constexpr double kFarEnd = {FAR_END!r};" in header_text()
    True
"""

from __future__ import annotations

__all__ = ["LOG_SIGMA_RANGE", "FAR_END", "FAR_NEGLIGIBLE", "FAR_NEGLIGIBLE_SQ", "SERIES_FROM", "H_SERIES",
           "MIX_MULTIPLIERS", "header_text"]

#: the range log σ is clamped to, as the published code does (σ from e⁻²⁰ to e⁵)
LOG_SIGMA_RANGE = (-20.0, 5.0)
#: a truncation end this many σ from every sample adds < 1e-70 to the gradient of a draw (fast_sample)
FAR_END = 20.0
#: ln of a far end's Φ ratio to the near end's below which the far end changes nothing (ΔF, KL)
FAR_NEGLIGIBLE = -50.0
#: width·(t + t_far) above which the far end of a truncated normal is negligible in the KL
FAR_NEGLIGIBLE_SQ = 100.0
#: h(t) = t(λ(t) − t) from its asymptotic series Σ H_SERIES[k]·t^(−2k) above this t (λ: inverse Mills ratio)
SERIES_FROM = 30.0
H_SERIES = (1.0, -2.0, 10.0, -74.0, 706.0, -8162.0)
#: the two multipliers of Wellons's "lowbias32" hash behind the counter-based uniforms (bmrs.nn.uniforms)
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


def header_text() -> str:
    """The C++ header ``bmrs_constants.h`` holding these values (floats written so they parse to the same
    double)."""
    def array(values) -> str:
        return ", ".join(repr(float(v)) for v in values)

    return "\n".join([
        "// Generated from bmrs/_kernels/constants.py by the kernel build: edit that file, not this one.",
        "#pragma once",
        "#include <cstdint>",
        f"constexpr double kFarEnd = {FAR_END!r};",
        f"constexpr double kFarNegligible = {FAR_NEGLIGIBLE!r};",
        f"constexpr double kFarNegligibleSq = {FAR_NEGLIGIBLE_SQ!r};",
        f"constexpr double kSeriesFrom = {SERIES_FROM!r};",
        f"constexpr double kHSeries[] = {{{array(H_SERIES)}}};",
        f"constexpr int kHTerms = {len(H_SERIES)};",
        f"constexpr uint32_t kMixMultiplier0 = {MIX_MULTIPLIERS[0]:#x}U;",
        f"constexpr uint32_t kMixMultiplier1 = {MIX_MULTIPLIERS[1]:#x}U;",
        "",
    ])
