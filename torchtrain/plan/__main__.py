from torchtrain.plan import main

main()
