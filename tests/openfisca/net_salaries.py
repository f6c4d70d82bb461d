"""Monthly net salaries and RGDU of N employees according to OpenFisca-France, in one simulation.

Run by OpenFisca's own interpreter, never imported by pytest (openfisca-france needs numpy<2.4,
the project a newer numpy; `bash .ci/install_openfisca.sh` makes .openfisca/venv):

    .openfisca/venv/bin/python tests/openfisca/net_salaries.py employees.json out.json

employees.json: {"period": "2026-11", "gross": [...], "cadre": [...], "hours": [...],
"alsace_moselle": [...], "headcount": [...]}, lists of equal length: monthly gross (EUR), cadre
(bool), paid hours in the month (weekly hours x 52 / 12), Alsace-Moselle regime (bool), company
headcount. Employees are present the whole month, with no overtime, bonus or absence.

out.json: the same keys' counterparts, one list each (EUR, positive amounts; OpenFisca computes in
float32 and does not round to the cent):
    net_before_tax          salaire_net (net avant impôt: after CSG/CRDS)
    net_taxable             salaire_imposable
    csg_deductible, csg_non_deductible, crds
    employee_contributions_excluding_csg    cotisations_salariales
    rgdu_rate               taux_allegement_general (2026 formula)
    rgdu                    rgdu_rate x assiette_allegement: the month's reduction (equal to
                            `allegement_general` here, without its year-to-date regularisation)
    rgdu_smic_reference     the SMIC the rate was computed with: coefficient_proratisation x
                            the RGDU hourly SMIC x 151.67 h
    ceiling                 plafond_securite_sociale (prorated for part time)
    prevoyance_cadres       prevoyance_obligatoire_cadre (employer, 1.50 % of T1 for cadres)
    ags                     ags (employer) and ags_rate: OpenFisca's AGS rate parameter
    seconds_load, seconds_compute   time to load the tax-benefit system, then to compute
"""
import json
import sys
import time

import numpy as np
from openfisca_core.simulation_builder import SimulationBuilder
from openfisca_france import FranceTaxBenefitSystem

FULL_TIME_HOURS = 151.67  # OpenFisca's nb_heures_travail_mensuel: 35 h x 52 / 12, rounded

# output key -> (OpenFisca variable, sign): OpenFisca's contributions are negative numbers.
OUTPUTS = {
    'net_before_tax': ('salaire_net', 1),
    'net_taxable': ('salaire_imposable', 1),
    'csg_deductible': ('csg_deductible_salaire', -1),
    'csg_non_deductible': ('csg_imposable_salaire', -1),
    'crds': ('crds_salaire', -1),
    'employee_contributions_excluding_csg': ('cotisations_salariales', -1),
    'rgdu_rate': ('taux_allegement_general', 1),
    'rgdu_base': ('assiette_allegement', 1),
    'ceiling': ('plafond_securite_sociale', 1),
    'prevoyance_cadres': ('prevoyance_obligatoire_cadre', -1),
    'ags': ('ags', -1),
    'proration': ('coefficient_proratisation', 1),
}


def compute(employees: dict) -> dict:
    period = employees['period']
    gross = np.asarray(employees['gross'], dtype=float)
    hours = np.asarray(employees['hours'], dtype=float)
    # 35 h a week is 151.666... h: full time, not a part time of 151.67 h.
    part_time = np.round(hours, 2) < FULL_TIME_HOURS
    started = time.perf_counter()
    tbs = FranceTaxBenefitSystem()
    loaded = time.perf_counter()
    simulation = SimulationBuilder().build_default_simulation(tbs, count=len(gross))  # one person per household
    inputs = {
        'salaire_de_base': gross,
        'categorie_salarie': np.where(np.asarray(employees['cadre'], dtype=bool), 'prive_cadre', 'prive_non_cadre'),
        'contrat_de_travail': np.where(part_time, 'temps_partiel', 'temps_plein'),
        'heures_remunerees_volume': np.where(part_time, hours, 0.0),
        'salarie_regime_alsace_moselle': np.asarray(employees['alsace_moselle'], dtype=bool),
        'effectif_entreprise': np.asarray(employees['headcount'], dtype=int),
    }
    for variable, values in inputs.items():
        simulation.set_input(variable, period, values)
    out = {key: sign * simulation.calculate(variable, period) for key, (variable, sign) in OUTPUTS.items()}
    out['rgdu'] = out['rgdu_rate'] * out['rgdu_base']
    computed = time.perf_counter()
    parameters = tbs.parameters(period + '-01')
    rgdu_smic = parameters.prelevements_sociaux.reductions_cotisations_sociales.allegement_general \
        .ensemble_des_entreprises.smic_reference
    out['rgdu_smic_reference'] = out.pop('proration') * rgdu_smic * FULL_TIME_HOURS
    result = {key: np.asarray(values, dtype=float).round(6).tolist() for key, values in out.items()}
    result['ags_rate'] = float(parameters.prelevements_sociaux.cotisations_regime_assurance_chomage.ags.employeur.ags
                               .rates[0])
    # For benchmarks/payroll.py: loading the tax-benefit system, then building and computing.
    result['seconds_load'] = loaded - started
    result['seconds_compute'] = computed - loaded
    return result


if __name__ == '__main__':
    with open(sys.argv[1], encoding='utf-8') as f:
        employees = json.load(f)
    with open(sys.argv[2], 'w', encoding='utf-8') as f:
        json.dump(compute(employees), f)
