from tests.pipelines.test_dsn import paid, declared  # noqa
import logging, json
def test_probe(paid, declared, tmp_path, caplog, capsys):
    import tests.pipelines.test_dsn as t
    caplog.set_level(logging.DEBUG)
    t.dsn.run(t._args(paid, tmp_path / 'o'))
    nirs = {e['nir'] for e in paid['employees']} | {e['nir'][:13] for e in paid['employees']}
    for rec in caplog.records:
        msg = rec.getMessage()
        hit = [n for n in nirs if n in msg]
        if hit:
            print('LOGGER', rec.name, rec.levelname, msg[:300].replace(hit[0], '<NIR>'))
            break
    out = capsys.readouterr()
    print('OUT', any(n in out.out + out.err for n in nirs))
