import time, torch, sys, random
exec(open('benchmarks/results/kernel-tokens/setup.py').read())
fits_dl, fits_moe = decoder_layer.fits, moe.fits
for mode in ("torch", "kernel", "torch", "kernel"):
    if mode == "torch": decoder_layer.fits = lambda *a: False; moe.fits = lambda t: False
    else: decoder_layer.fits, moe.fits = fits_dl, fits_moe
    ts = [pf(n, n) for n in range(int(sys.argv[3]), int(sys.argv[4]))]
    print(mode, "new lengths ms", [round(t) for t in ts])
