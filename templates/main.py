"""What the Dataflow Flex Template launcher runs (FLEX_TEMPLATE_PYTHON_PY_FILE in templates/Dockerfile).

The launcher starts ``python main.py --name=value ...`` with the template parameters and Beam's
options; the pipeline it runs is the one the image was built for (``$HRBATCH_PIPELINE``). The logic
lives in ``pipelines.templates.launch`` so it is installed, importable and tested like the rest.
"""
import sys

from pipelines import templates

if __name__ == '__main__':
    sys.exit(templates.launch())
