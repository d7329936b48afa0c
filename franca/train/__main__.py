from franca.train.train import main

main()
