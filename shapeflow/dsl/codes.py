"""Every diagnostic code, with a one-line title. Codes are stable: tests and CI configs key on
them, so a code is never reused for a different problem.

    E1xx  syntax and input          E5xx  whole-program rules
    E2xx  names                     E6xx  extends
    E3xx  types                     E7xx  needs and engines
    E4xx  parameters and config     E8xx  command-line overrides (--set)
    W1xx  unused definitions        W2xx  plug-ins
"""

CODES: dict[str, str] = {
    "E100": "syntax error",
    "E101": "unterminated string",
    "E102": "unknown escape in a string",
    "E103": "unexpected character",
    "E104": "number out of range",
    "E105": "spec is not valid UTF-8",
    "E106": "expression nested too deeply",
    "E107": "spec too large",
    "E108": "spec is empty",
    "E200": "unknown name",
    "E201": "unknown stage",
    "E202": "binding defined twice",
    "E203": "param defined twice",
    "E204": "name is both a param and a binding",
    "E205": "header or config key given twice",
    "E206": "unknown header key",
    "E207": "stage used as a value without calling it",
    "E208": "a literal (true, false, none) used as a name",
    "E300": "operator applied to types it does not combine",
    "E301": "binding kind does not match its value's type",
    "E302": "stage input of the wrong type",
    "E303": "too many positional arguments",
    "E304": "missing stage input",
    "E306": "argument given twice",
    "E307": "binding whose value is a constant",
    "E308": "stage output where a constant is required",
    "E309": "header value of the wrong type",
    "E400": "parameter or config value of the wrong type",
    "E401": "parameter or config value out of range or not allowed",
    "E402": "unknown parameter or config key",
    "E403": "missing required parameter",
    "E500": "no rollout binding",
    "E501": "no objective binding",
    "E502": "more than one objective",
    "E503": "cycle between bindings or params",
    "E505": "stage input computed in a later phase",
    "E600": "extends target not found or unreadable",
    "E601": "extends cycle",
    "E602": "extends target outside the allowed folders",
    "E603": "extends target is not a .shape file",
    "E700": "need that the rollout engine does not provide",
    "E701": "a stage needs what only a model (such as a critic) supplies, and no such model is declared",
    "E800": "--set names nothing settable",
    "E801": "--set value cannot be read",
    "W100": "binding never used",
    "W101": "param never used",
    "W200": "plug-in failed to load",
}
