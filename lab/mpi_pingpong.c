/*
 * Moves a buffer between pairs of ranks and checks every byte: each even rank r with
 * r + 1 (the same node under Slurm's block layout), and rank 0 with rank size/2
 * (another node when there are several). Prints one line per pair:
 *   pair A(hostA) B(hostB) BYTES bytes ok|CORRUPT ROUNDTRIP_US
 * Usage: mpi_pingpong [bytes (default 8 MiB)] [round trips (default 3)] [nofinalize]
 *
 * nofinalize: after a last barrier, exit without MPI_Finalize. MPICH 4.0.2 with UCX
 * over TCP (Debian 12) deadlocks in MPI_Finalize when ranks of different nodes have
 * talked: one rank waits in the PMI barrier without progressing UCX while another
 * waits in UCX for it to acknowledge an endpoint's close. It happens without any
 * container too (srun --mpi=pmi2 of this program on the lab, one rank per node:
 * every time), so the MPICH tests skip MPI_Finalize; their data is checked anyway.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int exchange(int me, int peer, unsigned char *buf, long bytes, int rounds, double *usec)
{
	int bad = 0;
	double start = MPI_Wtime();
	for (int round = 0; round < rounds; round++) {
		if (me < peer) {
			for (long i = 0; i < bytes; i++)
				buf[i] = (unsigned char)(i * 7 + round);
			MPI_Send(buf, (int)bytes, MPI_BYTE, peer, round, MPI_COMM_WORLD);
			MPI_Recv(buf, (int)bytes, MPI_BYTE, peer, round, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
			for (long i = 0; i < bytes; i++)
				bad |= buf[i] != (unsigned char)(i * 7 + round + 1);
		} else {
			MPI_Recv(buf, (int)bytes, MPI_BYTE, peer, round, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
			for (long i = 0; i < bytes; i++) {
				bad |= buf[i] != (unsigned char)(i * 7 + round);
				buf[i] = (unsigned char)(buf[i] + 1);
			}
			MPI_Send(buf, (int)bytes, MPI_BYTE, peer, round, MPI_COMM_WORLD);
		}
	}
	*usec = (MPI_Wtime() - start) * 1e6 / rounds;
	return bad;
}

static void report(int a, int b, const char *host, long bytes, int bad, double usec)
{
	char peer_host[MPI_MAX_PROCESSOR_NAME] = "";
	MPI_Recv(peer_host, sizeof(peer_host), MPI_CHAR, b, 999, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
	printf("pair %d(%s) %d(%s) %ld bytes %s %.0f\n", a, host, b, peer_host, bytes,
	       bad ? "CORRUPT" : "ok", usec);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	int rank, size, len;
	char host[MPI_MAX_PROCESSOR_NAME] = "";
	long bytes = argc > 1 ? atol(argv[1]) : 8L << 20;
	int rounds = argc > 2 ? atoi(argv[2]) : 3;
	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	MPI_Get_processor_name(host, &len);
	unsigned char *buf = malloc((size_t)bytes);
	if (!buf)
		MPI_Abort(MPI_COMM_WORLD, 1);
	int pairs[2][2] = { { rank & ~1, (rank & ~1) + 1 }, { 0, size / 2 } };
	for (int p = 0; p < 2; p++) {
		int a = pairs[p][0], b = pairs[p][1];
		int valid = b < size && a != b && !(p == 1 && size / 2 <= 1);
		if (valid && (rank == a || rank == b)) {
			double usec = 0;
			int bad = exchange(rank, rank == a ? b : a, buf, bytes, rounds, &usec);
			if (rank == a)
				report(a, b, host, bytes, bad, usec);
			else
				MPI_Send(host, (int)sizeof(host), MPI_CHAR, a, 999, MPI_COMM_WORLD);
		}
		MPI_Barrier(MPI_COMM_WORLD); /* every rank, paired or not */
	}
	free(buf);
	if (argc > 3 && strcmp(argv[3], "nofinalize") == 0) {
		MPI_Barrier(MPI_COMM_WORLD);
		fflush(stdout);
		_exit(0);
	}
	MPI_Finalize();
	return 0;
}
