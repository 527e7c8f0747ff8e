"""A numpy model of one warp's tile in cuda/attention_mma.cu's attention_chunks_mma_kernel: the
lanes' ldmatrix addresses and fragment registers, with ldmatrix (.x2/.x4, .trans) and
mma.m16n8k16 modelled after their PTX fragment layouts, checked against Q K^T and P V for head
dims 64-128, groups of 1-8 heads and part-filled tiles. It checks the kernel's index algebra
where no GPU is at hand (the kernel itself is tested on the GPU: tests/test_cuda.py,
attention_check.cu). Run by hand: python tests/cuda/mma_fragments.py"""
import numpy as np
rng = np.random.default_rng(0)

def ldsm(mem, addr_of_lane, trans, nmat):
    # mem: 2-D array (rows, cols) of the tile; addr_of_lane(l) -> (row, col) start of an 8-element row
    regs = np.zeros((32, nmat, 2))
    for i in range(nmat):
        rows = [addr_of_lane(8 * i + j) for j in range(8)]
        M = np.array([mem[r, c:c + 8] for (r, c) in rows])  # 8x8
        if trans:
            M = M.T
        for t in range(32):
            regs[t, i] = M[t // 4, 2 * (t % 4): 2 * (t % 4) + 2]
    return regs

def mma(C, A, B):
    # C[32,4], A[32,4,2] (regs a0a1,a2a3,a4a5,a6a7), B[32,2,2]; builds the matrices from fragments
    Am = np.zeros((16, 16)); Bm = np.zeros((16, 8))
    for t in range(32):
        g, c = t // 4, 2 * (t % 4)
        Am[g, c:c+2] = A[t, 0]; Am[g+8, c:c+2] = A[t, 1]; Am[g, c+8:c+10] = A[t, 2]; Am[g+8, c+8:c+10] = A[t, 3]
        Bm[c:c+2, g] = B[t, 0]; Bm[c+8:c+10, g] = B[t, 1]
    D = Am @ Bm
    out = C.copy()
    for t in range(32):
        g, c = t // 4, 2 * (t % 4)
        out[t, 0:2] += D[g, c:c+2]; out[t, 2:4] += D[g+8, c:c+2]
    return out

def run(D, G, n_valid):
    KS, NT = D // 16, D // 8
    Q = rng.standard_normal((G, D)); K = rng.standard_normal((16, D)); V = rng.standard_normal((16, D))
    K[n_valid:] = 0; V[n_valid:] = 0
    # qa: hi = Q, lo = 0 here (split checked separately)
    qa = np.zeros((32, KS, 4, 2))
    for t in range(32):
        g8, t4 = t // 4, t % 4
        if g8 < G:
            for kk in range(KS):
                qa[t, kk, 0] = Q[g8, kk*16 + 2*t4: kk*16 + 2*t4 + 2]
                qa[t, kk, 2] = Q[g8, kk*16 + 8 + 2*t4: kk*16 + 8 + 2*t4 + 2]
    sacc = np.zeros((2, 32, 4))
    for j in range(2):
        kk = 0
        while kk + 1 < KS:
            b = ldsm(K, lambda l: (8*j + (l & 7), kk*16 + 8*(l >> 3)), False, 4)
            sacc[j] = mma(sacc[j], qa[:, kk], b[:, 0:2]); sacc[j] = mma(sacc[j], qa[:, kk+1], b[:, 2:4])
            kk += 2
        if KS % 2 == 1:
            b = ldsm(K, lambda l: (8*j + (l & 7), (KS-1)*16 + 8*((l >> 3) & 1)), False, 2)
            sacc[j] = mma(sacc[j], qa[:, KS-1], b[:, 0:2])
    S_ref = Q @ K.T  # [G, 16]
    P = np.zeros((32, 4))
    for t in range(32):
        g8, t4 = t // 4, t % 4
        sc = [sacc[0][t][0] + sacc[0][t][2], sacc[0][t][1] + sacc[0][t][3], sacc[1][t][0] + sacc[1][t][2], sacc[1][t][1] + sacc[1][t][3]]
        rows = [2*t4, 2*t4+1, 8+2*t4, 9+2*t4]
        if g8 < G:
            for e in range(4):
                assert abs(sc[e] - S_ref[g8, rows[e]]) < 1e-9, (g8, rows[e])
        P[t] = np.exp(np.array(sc) / 10)  # any values: check O = P V
    pa = np.zeros((32, 4, 2))
    for t in range(32):
        pa[t, 0] = P[t, 0:2]; pa[t, 2] = P[t, 2:4]
    o = np.zeros((NT, 32, 4))
    for nt in range(0, NT, 2):
        b = ldsm(V, lambda l: (((l >> 3) & 1) * 8 + (l & 7), 8*(l >> 4) + 8*nt), True, 4)
        o[nt] = mma(o[nt], pa, b[:, 0:2]); o[nt+1] = mma(o[nt+1], pa, b[:, 2:4])
    # reference: Pm[g, row] from the lanes
    Pm = np.zeros((8, 16))
    for t in range(32):
        g8, t4 = t // 4, t % 4
        Pm[g8, [2*t4, 2*t4+1, 8+2*t4, 9+2*t4]] = P[t]
    O_ref = Pm @ V
    for t in range(32):
        g8, t4 = t // 4, t % 4
        for nt in range(NT):
            for e in range(2):
                got = o[nt][t][e] + o[nt][t][e + 2]
                assert abs(got - O_ref[g8, 8*nt + 2*t4 + e]) < 1e-9, (t, nt, e)
    print("ok", D, G, n_valid)

for D in (64, 80, 96, 128):
    for G in (1, 4, 5, 8):
        run(D, G, 16); run(D, G, 11)
