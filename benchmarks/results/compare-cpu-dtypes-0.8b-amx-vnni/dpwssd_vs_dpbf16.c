#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static inline __m512bh codes_bf16(const int8_t*p){const __m256i b=_mm256_loadu_si256((const __m256i*)p);
 const __m512 lo=_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
 const __m512 hi=_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b,1)));
 return _mm512_cvtne2ps_pbh(hi,lo);}
void k_bf16(const uint16_t*xb,const int8_t*W,int64_t N,int64_t K,float*y){
 for(int64_t n=0;n<N;n+=4){const int8_t*w0=W+n*K,*w1=w0+K,*w2=w1+K,*w3=w2+K;
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;
  for(int64_t k=0;k<K;k+=32){ if(n+8<=N) for(int j=0;j<4;j++) __builtin_prefetch(w0+(4+j)*K+k);
   const __m512bh a=(__m512bh)_mm512_loadu_si512(xb+k);
   a0=_mm512_dpbf16_ps(a0,codes_bf16(w0+k),a);a1=_mm512_dpbf16_ps(a1,codes_bf16(w1+k),a);
   a2=_mm512_dpbf16_ps(a2,codes_bf16(w2+k),a);a3=_mm512_dpbf16_ps(a3,codes_bf16(w3+k),a);}
  y[n]=_mm512_reduce_add_ps(a0);y[n+1]=_mm512_reduce_add_ps(a1);y[n+2]=_mm512_reduce_add_ps(a2);y[n+3]=_mm512_reduce_add_ps(a3);}}
void k_vnni(const int16_t*xq,const int8_t*W,int64_t N,int64_t K,float*y){
 for(int64_t n=0;n<N;n+=4){const int8_t*w0=W+n*K,*w1=w0+K,*w2=w1+K,*w3=w2+K;
  __m512i a0=_mm512_setzero_si512(),a1=a0,a2=a0,a3=a0;
  for(int64_t k=0;k<K;k+=32){ if(n+8<=N) for(int j=0;j<4;j++) __builtin_prefetch(w0+(4+j)*K+k);
   const __m512i a=_mm512_loadu_si512(xq+k);
   a0=_mm512_dpwssd_epi32(a0,_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w0+k))),a);
   a1=_mm512_dpwssd_epi32(a1,_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w1+k))),a);
   a2=_mm512_dpwssd_epi32(a2,_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w2+k))),a);
   a3=_mm512_dpwssd_epi32(a3,_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w3+k))),a);}
  y[n]=(float)_mm512_reduce_add_epi32(a0);y[n+1]=(float)_mm512_reduce_add_epi32(a1);y[n+2]=(float)_mm512_reduce_add_epi32(a2);y[n+3]=(float)_mm512_reduce_add_epi32(a3);}}
float sumread(const float*p,int64_t n){__m512 s=_mm512_setzero_ps();for(int64_t i=0;i<n;i+=16)s=_mm512_add_ps(s,_mm512_loadu_ps(p+i));return _mm512_reduce_add_ps(s);}
int main(){int64_t K=1024,N=224000;int8_t*W=aligned_alloc(64,N*K);for(int64_t i=0;i<N*K;i++)W[i]=(int8_t)(rand()%255-127);
 uint16_t*xb=aligned_alloc(64,K*2);int16_t*xq=aligned_alloc(64,K*2);for(int i=0;i<K;i++){xb[i]=0x3f80;xq[i]=(int16_t)(rand()%30000-15000);}
 float*y=malloc(N*4);float*F=aligned_alloc(64,N*K/4*4+64);for(int64_t i=0;i<N*K/4;i++)F[i]=1.0f;
 double tb=1e9,tv=1e9,ts=1e9;volatile float sink=0;
 for(int it=0;it<8;it++){double t=now();k_bf16(xb,W,N,K,y);t=now()-t;if(t<tb)tb=t;
  t=now();k_vnni(xq,W,N,K,y);t=now()-t;if(t<tv)tv=t;
  t=now();sink+=sumread(F,N*K/4);t=now()-t;if(t<ts)ts=t;}
 printf("bytes %.0f MB: bf16-codes %.2f ms (%.1f GB/s), vnni-int16 %.2f ms (%.1f GB/s), read %.2f ms (%.1f GB/s)\n",N*K/1e6,tb*1e3,N*K/tb/1e9,tv*1e3,N*K/tv/1e9,ts*1e3,N*K/ts/1e9);}
