/*
 * A kernel timeline for any CUDA program, without Nsight Systems (not on the GPU image):
 * loaded by the driver through CUDA_INJECTION64_PATH, it records every kernel, memcpy
 * and memset with CUPTI's activity API and, when the program exits, prints where the GPU
 * time went over a window of the run.
 *
 * Environment:
 *   KERNEL_TRACE_LAST_S   report only the last this many seconds of GPU activity (the
 *                         steady state of a training run; default: everything)
 *   KERNEL_TRACE_SPIN     comma-separated name parts of kernels that only wait (the
 *                         hand-off's spinning kernels): reported, but not counted as
 *                         busy time (default "await_counter")
 *   KERNEL_TRACE_OUT      file to write the report to (default: stderr)
 *   KERNEL_TRACE_TOP      how many kernel names to list (default 40)
 *   KERNEL_TRACE_NO_DRIVER  set: do not record driver calls (less overhead)
 *   KERNEL_TRACE_GAPS     how many of the longest idle gaps to list (default 15)
 *
 * Busy time is the union of the intervals of all non-spinning activity on all streams;
 * idle is the rest of the window: time the GPU waited for the host. A second table sums
 * the host's time inside CUDA driver calls (all threads), by call: where the host blocks.
 * The idle time is then split by gap length (many short gaps: launches slower than the
 * kernels; a few long ones: the host waiting for something), and the longest gaps are
 * listed with the activity that ends before each and the one that starts after it. The
 * kernels launched right after a host-to-device copy on their stream are counted (CubeCL
 * copies a launch's shapes and strides just before a kernel that reads them).
 */
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

typedef struct {
    uint64_t start, end;
    int name;        /* index into `names` */
    int host;        /* a driver call on the host, not GPU activity */
    uint32_t stream; /* the GPU activity's stream */
    int upload;      /* a host-to-device copy */
} Record;

static Record *records;
static size_t record_count, record_capacity;
static char **names;
static size_t name_count, name_capacity;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void check(CUptiResult result, const char *what) {
    if (result != CUPTI_SUCCESS) {
        const char *message = "?";
        cuptiGetResultString(result, &message);
        fprintf(stderr, "kernel_trace: %s: %s\n", what, message);
    }
}

/* Index of `name`, added if new (linear search over distinct names: a few hundred). */
static int name_index(const char *name) {
    for (size_t i = 0; i < name_count; i++)
        if (strcmp(names[i], name) == 0) return (int)i;
    if (name_count == name_capacity) {
        name_capacity = name_capacity ? 2 * name_capacity : 256;
        names = realloc(names, name_capacity * sizeof *names);
    }
    names[name_count] = strdup(name);
    return (int)name_count++;
}

static void add(uint64_t start, uint64_t end, const char *name, int host, uint32_t stream,
                int upload) {
    if (record_count == record_capacity) {
        record_capacity = record_capacity ? 2 * record_capacity : 1 << 16;
        records = realloc(records, record_capacity * sizeof *records);
    }
    records[record_count++] = (Record){start, end, name_index(name), host, stream, upload};
}

#define BUFFER_BYTES (8u << 20)

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = aligned_alloc(8, BUFFER_BYTES);
    *size = BUFFER_BYTES;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream, uint8_t *buffer,
                                      size_t size, size_t valid) {
    (void)context;
    (void)stream;
    (void)size;
    CUpti_Activity *record = NULL;
    pthread_mutex_lock(&lock);
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        switch (record->kind) {
        case CUPTI_ACTIVITY_KIND_KERNEL:
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)record;
            add(k->start, k->end, k->name ? k->name : "(unnamed kernel)", 0, k->streamId, 0);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)record;
            int upload = m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD;
            add(m->start, m->end, upload ? "[memcpy HtoD]" : "[memcpy]", 0, m->streamId, upload);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)record;
            add(m->start, m->end, "[memset]", 0, m->streamId, 0);
            break;
        }
        case CUPTI_ACTIVITY_KIND_DRIVER: {
            CUpti_ActivityAPI *api = (CUpti_ActivityAPI *)record;
            const char *name = NULL;
            if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, api->cbid, &name) != CUPTI_SUCCESS ||
                !name)
                name = "(driver call)";
            add(api->start, api->end, name, 1, 0, 0);
            break;
        }
        default:
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    free(buffer);
}

static int by_start(const void *a, const void *b) {
    uint64_t x = ((const Record *)a)->start, y = ((const Record *)b)->start;
    return (x > y) - (x < y);
}

typedef struct {
    int name;
    uint64_t total;
    uint64_t count;
    uint64_t uploaded; /* launches that a host-to-device copy on their stream preceded */
    int host;
} Sum;

static int by_total(const void *a, const void *b) {
    uint64_t x = ((const Sum *)a)->total, y = ((const Sum *)b)->total;
    return (x < y) - (x > y);
}

typedef struct {
    uint64_t length;
    int before, after; /* names of the activities around the gap */
} Gap;

static int by_length(const void *a, const void *b) {
    uint64_t x = ((const Gap *)a)->length, y = ((const Gap *)b)->length;
    return (x < y) - (x > y);
}

/* Upper bounds (ns) of the gap-length classes; the last class is everything longer. */
static const uint64_t gap_classes[] = {2000, 10000, 50000, 200000, 1000000};
#define GAP_CLASSES (sizeof gap_classes / sizeof gap_classes[0] + 1)

static int is_spin(const char *name, const char *spin) {
    char parts[512];
    snprintf(parts, sizeof parts, "%s", spin);
    for (char *part = strtok(parts, ","); part; part = strtok(NULL, ","))
        if (*part && strstr(name, part)) return 1;
    return 0;
}

static void report(void) {
    check(cuptiActivityFlushAll(1), "flush");
    pthread_mutex_lock(&lock);
    const char *out_path = getenv("KERNEL_TRACE_OUT");
    FILE *out = out_path ? fopen(out_path, "w") : stderr;
    if (!out) out = stderr;
    if (record_count == 0) {
        fprintf(out, "kernel_trace: no GPU activity recorded\n");
        goto done;
    }
    qsort(records, record_count, sizeof *records, by_start);
    uint64_t last_end = 0;
    for (size_t i = 0; i < record_count; i++)
        if (!records[i].host && records[i].end > last_end) last_end = records[i].end;
    uint64_t window_start = records[0].start;
    const char *last_s = getenv("KERNEL_TRACE_LAST_S");
    if (last_s) {
        uint64_t span = (uint64_t)(atof(last_s) * 1e9);
        if (last_end - window_start > span) window_start = last_end - span;
    }
    const char *spin = getenv("KERNEL_TRACE_SPIN");
    if (!spin) spin = "await_counter";
    char *spinning = calloc(name_count, 1);
    for (size_t i = 0; i < name_count; i++) spinning[i] = (char)is_spin(names[i], spin);

    Sum *sums = calloc(name_count, sizeof *sums);
    for (size_t i = 0; i < name_count; i++) sums[i].name = (int)i;
    uint64_t busy = 0, cover_end = window_start, all_time = 0, launches = 0;
    /* Per stream (a few), whether its last activity was a host-to-device copy: CubeCL
     * copies a launch's shapes and strides just before the kernel that reads them. */
    enum { STREAMS = 64 };
    uint32_t stream_ids[STREAMS];
    int stream_uploaded[STREAMS];
    size_t stream_count = 0;
    Gap *gaps = calloc(record_count + 1, sizeof *gaps);
    size_t gap_count = 0;
    int last_name = -1;
    uint64_t class_time[GAP_CLASSES] = {0}, class_count[GAP_CLASSES] = {0};
    for (size_t i = 0; i < record_count; i++) {
        Record r = records[i];
        if (r.end <= window_start) continue;
        if (r.start < window_start) r.start = window_start;
        if (r.start >= last_end) continue;
        sums[r.name].total += r.end - r.start;
        sums[r.name].count++;
        sums[r.name].host = r.host;
        if (r.host) continue;
        launches++;
        size_t s = 0;
        while (s < stream_count && stream_ids[s] != r.stream) s++;
        if (s == stream_count && stream_count < STREAMS) {
            stream_ids[stream_count] = r.stream;
            stream_uploaded[stream_count++] = 0;
        }
        if (s < stream_count) {
            if (!r.upload && stream_uploaded[s]) sums[r.name].uploaded++;
            stream_uploaded[s] = r.upload;
        }
        if (spinning[r.name]) continue;
        all_time += r.end - r.start;
        /* Records are sorted by start: extend the covered union. */
        if (r.start > cover_end && last_name >= 0) {
            uint64_t length = r.start - cover_end;
            gaps[gap_count++] = (Gap){length, last_name, r.name};
            size_t c = 0;
            while (c < GAP_CLASSES - 1 && length > gap_classes[c]) c++;
            class_time[c] += length;
            class_count[c]++;
        }
        if (r.end > cover_end) {
            busy += r.end - (r.start > cover_end ? r.start : cover_end);
            cover_end = r.end;
            last_name = r.name;
        }
    }
    double window = (double)(last_end - window_start);
    fprintf(out, "window %.3f s, %llu GPU activities; busy %.3f s (%.1f%%), idle %.3f s; "
                 "summed activity time %.3f s\n",
            window / 1e9, (unsigned long long)launches, busy / 1e9, 100.0 * busy / window,
            (window - busy) / 1e9, all_time / 1e9);
    qsort(sums, name_count, sizeof *sums, by_total);
    const char *top_s = getenv("KERNEL_TRACE_TOP");
    size_t top = top_s ? (size_t)atoi(top_s) : 40;
    fprintf(out, "%10s %9s %8s %6s %8s  %s\n", "total ms", "count", "mean us", "% busy",
            "uploads", "name");
    for (size_t i = 0, shown = 0; i < name_count && shown < top; i++) {
        if (sums[i].count == 0) break;
        if (sums[i].host) continue;
        shown++;
        fprintf(out, "%10.2f %9llu %8.1f %6.1f %8llu  %s%.150s\n", sums[i].total / 1e6,
                (unsigned long long)sums[i].count, sums[i].total / 1e3 / sums[i].count,
                spinning[sums[i].name] ? 0.0 : 100.0 * sums[i].total / busy,
                (unsigned long long)sums[i].uploaded,
                spinning[sums[i].name] ? "(spin) " : "", names[sums[i].name]);
    }
    /* The kernels that host-to-device copies preceded most often. */
    Sum *by_uploads = malloc(name_count * sizeof *by_uploads);
    memcpy(by_uploads, sums, name_count * sizeof *sums);
    for (size_t i = 0; i < name_count; i++) by_uploads[i].total = by_uploads[i].uploaded;
    qsort(by_uploads, name_count, sizeof *by_uploads, by_total);
    fprintf(out, "\nkernels launched right after a host-to-device copy on their stream\n");
    fprintf(out, "%9s %9s  %s\n", "uploads", "count", "name");
    for (size_t i = 0; i < name_count && i < top; i++) {
        if (by_uploads[i].uploaded == 0) break;
        fprintf(out, "%9llu %9llu  %.150s\n", (unsigned long long)by_uploads[i].uploaded,
                (unsigned long long)by_uploads[i].count, names[by_uploads[i].name]);
    }
    free(by_uploads);
    fprintf(out, "\nhost time in CUDA driver calls over the window (all threads)\n");
    fprintf(out, "%10s %9s %8s  %s\n", "total ms", "count", "mean us", "call");
    for (size_t i = 0, shown = 0; i < name_count && shown < 25; i++) {
        if (sums[i].count == 0) break;
        if (!sums[i].host) continue;
        shown++;
        fprintf(out, "%10.2f %9llu %8.1f  %s\n", sums[i].total / 1e6,
                (unsigned long long)sums[i].count, sums[i].total / 1e3 / sums[i].count,
                names[sums[i].name]);
    }
    fprintf(out, "\nidle gaps between GPU activities, by length\n");
    fprintf(out, "%14s %10s %9s\n", "length", "total ms", "count");
    for (size_t c = 0; c < GAP_CLASSES; c++) {
        char label[32];
        if (c < GAP_CLASSES - 1)
            snprintf(label, sizeof label, "<= %.0f us", gap_classes[c] / 1e3);
        else
            snprintf(label, sizeof label, "> %.0f us", gap_classes[c - 1] / 1e3);
        fprintf(out, "%14s %10.2f %9llu\n", label, class_time[c] / 1e6,
                (unsigned long long)class_count[c]);
    }
    qsort(gaps, gap_count, sizeof *gaps, by_length);
    const char *gaps_s = getenv("KERNEL_TRACE_GAPS");
    size_t shown_gaps = gaps_s ? (size_t)atoi(gaps_s) : 15;
    fprintf(out, "\nlongest idle gaps\n%10s  %s\n", "us", "after -> before");
    for (size_t i = 0; i < gap_count && i < shown_gaps; i++)
        fprintf(out, "%10.1f  %.70s -> %.70s\n", gaps[i].length / 1e3, names[gaps[i].before],
                names[gaps[i].after]);
    free(gaps);
    free(sums);
    free(spinning);
done:
    if (out != stderr) fclose(out);
    pthread_mutex_unlock(&lock);
}

/* Called by the CUDA driver during cuInit when CUDA_INJECTION64_PATH names this library. */
int InitializeInjection(void) {
    check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "callbacks");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "kernels");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "memcpy");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET), "memset");
    if (!getenv("KERNEL_TRACE_NO_DRIVER"))
        check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER), "driver calls");
    atexit(report);
    return 1;
}
