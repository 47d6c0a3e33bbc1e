/* Each rank prints where it runs and which root it sees: the container's os-release. */
#include <mpi.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void pretty_name(char *out, size_t size) {
    char line[512];
    FILE *f = fopen("/etc/os-release", "r");
    snprintf(out, size, "unknown");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "PRETTY_NAME=", 12) == 0) {
            char *value = line + 12;
            value[strcspn(value, "\n")] = 0;
            if (*value == '"') { value++; value[strcspn(value, "\"")] = 0; }
            snprintf(out, size, "%s", value);
        }
    }
    fclose(f);
}

int main(int argc, char **argv) {
    int rank, size;
    char host[256], name[256];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    pretty_name(name, sizeof name);
    printf("rank %d of %d on %s: %s\n", rank, size, host, name);
    MPI_Finalize();
    return 0;
}
