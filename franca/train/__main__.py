from franca.train.train import main
from franca.utils.cli import run_command

run_command(main)
