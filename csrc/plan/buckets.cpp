#include "plan/buckets.h"

#include <algorithm>
#include <tuple>

namespace refit {

void cut_into_buckets(const std::vector<Segment>& in, int64_t limit, bool staged_src,
                      std::vector<Segment>& out, std::vector<Message>& messages) {
    int64_t bucket = 0, used = 0;
    const int64_t peer = in.empty() ? 0 : in.front().peer;
    auto close = [&]() {
        if (used > 0) messages.push_back({peer, bucket, 0, used});
        ++bucket;
        used = 0;
    };
    auto put = [&](Segment seg) {  // seg fits in the space left
        seg.bucket = bucket;
        if (staged_src) {
            seg.src_buffer = -1;
            seg.src_offset = used;
            seg.src_pitch = seg.row_bytes;
        } else {
            seg.dst_buffer = -1;
            seg.dst_offset = used;
            seg.dst_pitch = seg.row_bytes;
        }
        used += seg.bytes();
        out.push_back(seg);
    };
    for (Segment seg : in) {
        if (seg.row_bytes > limit) {  // rows bigger than a message: one row at a time, in pieces
            for (int64_t r = 0; r < seg.rows; ++r) {
                int64_t done = 0;
                while (done < seg.row_bytes) {
                    if (used == limit) close();
                    const int64_t take = std::min(limit - used, seg.row_bytes - done);
                    Segment part = seg;
                    part.rows = 1;
                    part.row_bytes = take;
                    part.src_offset = seg.src_offset + r * seg.src_pitch + done;
                    part.dst_offset = seg.dst_offset + r * seg.dst_pitch + done;
                    part.src_pitch = part.dst_pitch = take;
                    put(part);
                    done += take;
                }
            }
            continue;
        }
        while (seg.rows > 0) {
            int64_t fit = (limit - used) / seg.row_bytes;
            if (fit == 0) {
                close();
                continue;
            }
            Segment part = seg;
            part.rows = std::min(fit, seg.rows);
            put(part);
            seg.rows -= part.rows;
            if (seg.rows == 0) break;  // no next row: its offset may not fit in int64
            seg.src_offset += part.rows * seg.src_pitch;
            seg.dst_offset += part.rows * seg.dst_pitch;
        }
    }
    if (used > 0) messages.push_back({peer, bucket, 0, used});
}

void bucket_side(std::vector<Segment>& segs, std::vector<Message>& messages,
                 std::vector<int64_t>& staging, int64_t limit, bool staged_src) {
    std::stable_sort(segs.begin(), segs.end(),
                     [](const Segment& a, const Segment& b) { return a.peer < b.peer; });
    std::vector<Segment> out;
    out.reserve(segs.size());
    messages.clear();
    std::vector<Segment> run;
    for (size_t i = 0; i < segs.size();) {
        size_t j = i;
        while (j < segs.size() && segs[j].peer == segs[i].peer) ++j;
        run.assign(segs.begin() + i, segs.begin() + j);
        cut_into_buckets(run, limit, staged_src, out, messages);
        i = j;
    }
    auto by_bucket_peer = [](const auto& a, const auto& b) {
        return std::tie(a.bucket, a.peer) < std::tie(b.bucket, b.peer);
    };
    std::stable_sort(out.begin(), out.end(), by_bucket_peer);
    std::sort(messages.begin(), messages.end(), by_bucket_peer);
    int64_t num_buckets = messages.empty() ? 0 : messages.back().bucket + 1;
    staging.assign(num_buckets, 0);
    for (Message& m : messages) {
        m.offset = staging[m.bucket];
        staging[m.bucket] += m.bytes;
    }
    // Make each segment's staging offset relative to its bucket, not its message.
    size_t m = 0;
    for (Segment& seg : out) {
        while (messages[m].bucket != seg.bucket || messages[m].peer != seg.peer) ++m;
        (staged_src ? seg.src_offset : seg.dst_offset) += messages[m].offset;
    }
    segs.swap(out);
}

void assign_buckets(RankPlan& plan, int64_t bucket_bytes) {
    bucket_side(plan.send, plan.send_messages, plan.send_staging_bytes, bucket_bytes,
                /*staged_src=*/false);
    bucket_side(plan.recv, plan.recv_messages, plan.recv_staging_bytes, bucket_bytes,
                /*staged_src=*/true);
    plan.num_buckets = std::max(plan.send_staging_bytes.size(), plan.recv_staging_bytes.size());
}

}  // namespace refit
