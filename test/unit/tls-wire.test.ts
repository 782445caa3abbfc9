import { expect } from 'chai';
import { connectError, isTlsFailure, tlsReason } from '../../src/wire/tls.js';

const err = (message: string, code?: string) => Object.assign(new Error(message), code ? { code } : {});

describe('wire/tls: coding connection failures', () => {
  it('OpenSSL verification results and ERR_SSL_/ERR_TLS_ codes are TLS failures; network errors are not', () => {
    for (const c of ['CERT_HAS_EXPIRED', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'ERR_TLS_CERT_ALTNAME_INVALID', 'ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE', 'EPROTO']) {
      expect(isTlsFailure(err('x', c)), c).to.equal(true);
    }
    for (const c of ['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', undefined]) expect(isTlsFailure(err('x', c)), String(c)).to.equal(false);
  });

  it('a wss:// TLS failure is TM_ERR_TLS naming the peer and the reason; on ws:// or a network error it is TM_ERR_CONNECTION', () => {
    const expired = connectError('wss://10.0.0.2:7890', err('certificate has expired', 'CERT_HAS_EXPIRED'));
    expect(expired.code).to.equal('TM_ERR_TLS');
    expect(expired.message).to.equal('the certificate of secondary wss://10.0.0.2:7890 was refused: certificate has expired (CERT_HAS_EXPIRED)');
    const host = connectError('wss://10.0.0.2:7890', err("Hostname/IP does not match certificate's altnames: IP: 10.0.0.2 is not in the cert's list: 10.0.0.3", 'ERR_TLS_CERT_ALTNAME_INVALID'));
    expect(host.code).to.equal('TM_ERR_TLS');
    expect(host.message).to.contain('wss://10.0.0.2:7890').and.contain('ERR_TLS_CERT_ALTNAME_INVALID');
    const plain = connectError('wss://h:1', err('write EPROTO 80CC6CC94B7F0000:error:0A00010B:SSL routines:ssl3_get_record:wrong version number:../deps/openssl/ssl/record/ssl3_record.c:350:', 'EPROTO'));
    expect(plain.code).to.equal('TM_ERR_TLS');
    expect(plain.message).to.equal('TLS handshake with secondary wss://h:1 failed: wrong version number (EPROTO) (is it listening without tls:?)');
    expect(connectError('wss://h:1', err('connect ECONNREFUSED 10.0.0.2:7890', 'ECONNREFUSED')).code).to.equal('TM_ERR_CONNECTION');
    expect(connectError('ws://h:1', err('x', 'EPROTO')).code).to.equal('TM_ERR_CONNECTION');
  });

  it("tlsReason keeps OpenSSL's reason and the code once", () => {
    expect(tlsReason(err('a:error:0A000412:SSL routines:ssl3_read_bytes:sslv3 alert bad certificate:../ssl/record/rec_layer_s3.c:1586:', 'ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE'))).to.equal(
      'sslv3 alert bad certificate (ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE)',
    );
    expect(tlsReason(err('unable to verify the first certificate', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE'))).to.equal('unable to verify the first certificate (UNABLE_TO_VERIFY_LEAF_SIGNATURE)');
  });
});
